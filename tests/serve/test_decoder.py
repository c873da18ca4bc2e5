"""The serving decoder against transformers on random tiny models of each layout: the logits of prefill (right-padded
rows of different lengths) and of decode steps at different positions per row equal the transformers model's, with
and without a PEFT LoRA on the projections that the decoder fuses."""

from __future__ import annotations

import functools

import pytest
import torch

VOCAB = 96
LLAMA = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=64, initializer_range=0.2)
CASES = {
    "llama-gqa-untied": ("llama", dict(LLAMA, tie_word_embeddings=False)),
    "qwen2-qkv-bias": ("qwen2", dict(LLAMA, tie_word_embeddings=True)),
    "llama3-rope-scaling": ("llama", dict(LLAMA, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "linear-rope-scaling": ("llama", dict(LLAMA, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("mistral", dict(LLAMA, sliding_window=None)),
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.2)),
}


def _model(model_type: str, config: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, **config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # norms and biases start at 1 and 0: move them, so a mix-up cannot hide
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def _decoder(model, max_slots: int = 4):
    from stemma.models import families
    from stemma.serve.decoder import Decoder

    family = families.checked(model.config)
    return Decoder(family.decoder_weights(model), family.decoder_shape(model.config), max_slots), family


def _compare(reference, dec, aids: torch.Tensor, steps: int = 3) -> None:
    """Prefill three right-padded rows, then decode ``steps`` tokens; every logit row equals the reference's."""
    torch.manual_seed(1)
    B = len(aids)
    lengths = torch.tensor([21, 9, 14][:B])
    tokens = torch.randint(0, VOCAB, (B, int(lengths.max())))
    rows = [tokens[i, : lengths[i]].tolist() for i in range(B)]
    with torch.no_grad():
        out = dec.prefill(tokens, lengths, 0, aids)
        for i in range(B):
            want = reference(i)(torch.tensor([rows[i]])).logits[0, -1]
            torch.testing.assert_close(out[i], want, atol=2e-5, rtol=1e-4)
        positions = lengths.clone()
        for _ in range(steps):
            nxt = torch.randint(0, VOCAB, (B,))
            out = dec.decode(nxt, positions, aids)
            for i in range(B):
                rows[i].append(int(nxt[i]))
                want = reference(i)(torch.tensor([rows[i]])).logits[0, -1]
                torch.testing.assert_close(out[i], want, atol=2e-5, rtol=1e-4)
            positions += 1


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers(case):
    model = _model(*CASES[case])
    dec, _ = _decoder(model)
    if case == "llama3-rope-scaling":  # the scaled frequencies really are not the default ones
        hd = LLAMA["hidden_size"] // LLAMA["num_attention_heads"]
        plain = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        assert not torch.allclose(model.model.rotary_emb.inv_freq, plain)
    if case == "qwen2-qkv-bias":
        assert dec.linears[0]["attn.qkv"].bias is not None and dec.linears[0]["attn.out"].bias is None
    _compare(lambda i: model, dec, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize(("fused_columns", "kernel"), [(128, True), (0, True), (0, False)],
                         ids=["fused", "grouped", "grouped-torch"])
@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen2-qkv-bias", "gpt2"])
def test_lora_on_fused_projections_equals_peft(case, fused_columns, kernel, monkeypatch):
    """PEFT adapters on different projections (on q/k/v/gate/up only, on everything), served in one batch with a
    base row, in each form of per-row LoRA (grouped rows by the compiled kernel and by PyTorch ops), over
    consecutive bank slots (the bank's own slices) and not (gathered): each row's logits equal its merged PEFT
    model's."""
    from peft import LoraConfig, get_peft_model

    from stemma.serve import kernels, lora
    from stemma.serve.lora import lora_from_peft

    monkeypatch.setattr(lora, "FUSED_COLUMNS", fused_columns)
    if not kernel:
        monkeypatch.setattr(kernels, "sgmv", lambda: None)

    model_type, config = CASES[case]
    targets = [["c_attn", "c_fc"], ["c_attn", "c_proj", "c_fc"]] if model_type == "gpt2" else \
        [["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
         ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
    targets.append(targets[0])
    base = _model(model_type, config)
    dec, family = _decoder(base)
    site = functools.partial(family.lora_site, config=base.config)
    merged, deltas = [], []
    for j, target in enumerate(targets):
        peft_model = get_peft_model(_model(model_type, config), LoraConfig(
            r=4, lora_alpha=8, target_modules=target, fan_in_fan_out=model_type == "gpt2"))
        torch.manual_seed(10 + j)
        with torch.no_grad():  # B starts at zero: make the delta visible
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3)
        tensors = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items() if "lora_" in k}
        cfg = {"r": 4, "lora_alpha": 8, "peft_type": "LORA"}
        deltas.append(lora_from_peft(tensors, cfg, dec.shape, site))
        slot = dec.add_adapter(deltas[-1])
        assert slot == j + 1
        merged.append(peft_model.merge_and_unload().eval())
    probe = torch.arange(12)[None]
    with torch.no_grad():
        assert all((m(probe).logits - base(probe).logits).abs().max() > 1e-2 for m in merged)  # the deltas matter
    refs = [merged[0], base, merged[1]]
    _compare(lambda i: refs[i], dec, torch.tensor([1, 0, 2]))
    _compare(lambda i: merged[0], dec, torch.tensor([1, 1, 1]))  # one adapter for every row
    refs = [merged[2], base, merged[0]]
    _compare(lambda i: refs[i], dec, torch.tensor([3, 0, 1]))  # slots 1 and 3: not consecutive
    fused = fused_columns > 0
    assert all((a is None) == fused for a in dec.bank.a.values())  # fused: the A's live in the fused columns only
    # The bank changes after the fused columns were built: the A's come back out of them unchanged.
    dec.remove_adapter(2)
    assert all(a is not None for a in dec.bank.a.values())
    refs = [merged[0], base, merged[2]]
    _compare(lambda i: refs[i], dec, torch.tensor([1, 0, 3]))
    _compare(lambda i: merged[2], dec, torch.tensor([3, 3, 3]))
    assert dec.add_adapter(deltas[1]) == 2
    _compare(lambda i: merged[2], dec, torch.tensor([3, 3, 3]))  # a uniform batch right after the change
    refs = [merged[1], merged[0], base]
    _compare(lambda i: refs[i], dec, torch.tensor([2, 1, 0]))
