"""The serving engine against Hugging Face: greedy output equals `generate` on the merged model, for the base,
a single adapter, an adapter chain and a batch mixing all of them, on the GPT-2 tree and the Llama tree (GQA,
RoPE, SwiGLU); plus the engine's own mechanics."""

from __future__ import annotations

import pytest
import torch

from stemma.errors import StemmaError
from stemma.serve.config import ServeConfig
from stemma.serve.engine import SamplingParams
from stemma.serve.pool import ModelPool

from .conftest import run_sequences

PROMPTS = ["The ls command lists", "NAME\n       grep - print lines", "def main():\n    return",
           "This program is free software", "-r, --recursive"]
MODELS = ["en", "en/software", "en/software/python", "en/legal", "master"]
NEW = 24


@pytest.fixture(scope="module")
def pool(family_ws):
    p = ModelPool(family_ws, ServeConfig(max_batch=32))
    yield p
    p.close()


@pytest.fixture(scope="module")
def references(family_ws):
    """Greedy continuations by Hugging Face `generate` on each merged model (stopping at end-of-text)."""
    from stemma.models.tokenizer import eos_id

    tok = family_ws.tokenizer(family_ws.resolve_version("en").row.tokenizer)
    eos = eos_id(tok)
    prompts = [tok.encode(p).ids for p in PROMPTS]
    refs = {}
    for m in MODELS:
        hf = family_ws.load_model(family_ws.resolve_version(m).id)
        for i, p in enumerate(prompts):
            out = hf.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=eos,
                              pad_token_id=eos)[0, len(p):].tolist()
            refs[m, i] = out[: out.index(eos)] if eos in out else out
    return prompts, refs


def _wait_idle(engine, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.005)


def _greedy(n=NEW, **kw):
    return SamplingParams(max_tokens=n, temperature=0.0, **kw)


@pytest.mark.parametrize("model", MODELS)
def test_greedy_equals_hf_generate(pool, references, model):
    prompts, refs = references
    seqs, _ = run_sequences(pool, [(model, p, _greedy()) for p in prompts])
    for i, s in enumerate(seqs):
        assert s.generated == refs[model, i], f"{model} prompt {i}"


@pytest.mark.parametrize(("fused_columns", "run_rows", "kernel"),
                         [(128, 10**6, True), (0, 10**6, True), (0, 10**6, False), (128, 1, True), (0, 1, True)],
                         ids=["fused", "grouped", "grouped-torch", "fused-runs", "runs"])
def test_logits_equal_merged_model(pool, family_ws, references, fused_columns, run_rows, kernel, monkeypatch):
    """The tiny trees' greedy text is repetitive, so tokens alone could hide a small error: the logits of a mixed
    batch (base, adapter, chain) and of each full-weight model, prefill and decode, equal the merged model's. Each
    form of per-row LoRA: fused columns or not, rows grouped by adapter (by the compiled kernel, and by PyTorch ops)
    or taken in runs of one adapter."""
    from stemma.serve import kernels
    from stemma.serve import lora as serve_lora

    monkeypatch.setattr(serve_lora, "FUSED_COLUMNS", fused_columns)
    monkeypatch.setattr(serve_lora, "RUN_ROWS", run_rows)
    kernel_calls = []
    if not kernel:
        monkeypatch.setattr(kernels, "sgmv", lambda: None)
    elif kernels.sgmv() is None:
        pytest.skip("the compiled kernel is not available here")
    real_call = kernels.call_sgmv
    monkeypatch.setattr(kernels, "call_sgmv", lambda *a: kernel_calls.append(1) or real_call(*a))
    plans = []
    real_of = serve_lora.LoraPlan.of
    monkeypatch.setattr(serve_lora.LoraPlan, "of", staticmethod(lambda aids: plans.append(real_of(aids)) or plans[-1]))
    prompts, _ = references
    for group in (["en", "en/software", "en/software/python"], ["en/legal"], ["master"]):
        targets = [pool.resolve(m) for m in group]
        engine = pool._load_engine(targets[0])  # a decoder of its own, outside the scheduler's engines
        dec = engine.decoder
        aids = torch.tensor([dec.add_adapter(engine.load_adapter(t.adapters)) if t.adapters else 0 for t in targets])
        models = [family_ws.load_model(t.version_id) for t in targets]
        rows = [list(prompts[i + 1]) for i in range(len(targets))]
        lengths = torch.tensor([len(r) for r in rows])
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r)
        with torch.no_grad():
            out = dec.prefill(tokens, lengths, 0, aids)
            for step in range(4):
                for i, (m, r) in enumerate(zip(models, rows)):
                    want = m(torch.tensor([r])).logits[0, -1]
                    torch.testing.assert_close(out[i], want, atol=1e-4, rtol=1e-4, msg=f"{group[i]} step {step}")
                nxt = torch.tensor([(7 * step + 3 * i) % dec.shape.vocab_size for i in range(len(rows))])
                positions = torch.tensor([len(r) for r in rows])
                for r, t in zip(rows, nxt.tolist()):
                    r.append(t)
                out = dec.decode(nxt, positions, aids)
    mixed = [p for p in plans if p is not None and p.uniform is None]
    assert mixed and all((p.runs is not None) == (run_rows == 1) for p in mixed)
    assert bool(kernel_calls) == (kernel and not fused_columns and run_rows > 1)  # the form named is the one run


@pytest.mark.parametrize(("packed", "fused_columns"), [(True, 128), (True, 0), (False, 128)],
                         ids=["fused", "grouped", "fused-unpacked"])
def test_mixed_batch_equals_hf_generate(pool, family_ws, references, packed, fused_columns, monkeypatch):
    """Every model on every prompt in one submission: adapters, a chain and the base share decode steps.
    Each form of per-row LoRA: the bank's A's as extra columns of the base weights, and grouped batched matmuls;
    and the base GEMMs with oneDNN-packed and with plain weights."""
    from stemma.serve import decoder as serve_decoder
    from stemma.serve import linear as serve_linear
    from stemma.serve import lora as serve_lora

    if not packed:
        monkeypatch.setattr(serve_linear, "PACKED", False)
        pool = ModelPool(family_ws, ServeConfig(max_batch=32))
    elif not serve_linear.PACKED:
        pytest.skip("this PyTorch has no oneDNN packed linear")
    monkeypatch.setattr(serve_lora, "FUSED_COLUMNS", fused_columns)
    calls = []  # (in prefill, fused columns) of every block linear
    in_prefill = []
    real, real_prefill = serve_decoder.Decoder._linear, serve_decoder.Decoder.prefill
    monkeypatch.setattr(serve_decoder.Decoder, "_linear", lambda self, x, layer, name, plan: calls.append(
        (bool(in_prefill), self._fused.get(name, 0) if plan is not None and plan.uniform is None else 0))
        or real(self, x, layer, name, plan))

    def prefill(self, *args):
        in_prefill.append(1)
        try:
            return real_prefill(self, *args)
        finally:
            in_prefill.clear()

    monkeypatch.setattr(serve_decoder.Decoder, "prefill", prefill)
    try:
        prompts, refs = references
        jobs = [(m, p, _greedy()) for m in MODELS for p in prompts]
        seqs, _ = run_sequences(pool, jobs)
        keys = [(m, i) for m in MODELS for i in range(len(prompts))]
        assert {k: s.generated for k, s in zip(keys, seqs)} == {k: refs[k] for k in keys}
        # Uneven groups (5 rows of one adapter, 2 of the chain, 1 base row): the padded grouping must stay exact.
        jobs = ([("en/software", p, _greedy()) for p in prompts] +
                [("en/software/python", p, _greedy()) for p in prompts[:2]] + [("en", prompts[3], _greedy())])
        seqs, _ = run_sequences(pool, jobs)
        expect = [refs["en/software", i] for i in range(5)] + [refs["en/software/python", i] for i in range(2)] + \
            [refs["en", 3]]
        assert [s.generated for s in seqs] == expect
        fused = {pre for pre, cols in calls if cols}  # prefill and decode took the fused form
        assert fused == ({True, False} if fused_columns else set())
        en = pool.engines[pool.resolve("en").base_id]
        assert en.decoder.lm_head.packed == packed
        assert len(en.adapters) == 2  # en/software and the pre-combined chain en/software/python
        _wait_idle(en)  # the last event is sent inside a step; finished rows leave at its end
        assert not en.running and not en.waiting
    finally:
        if not packed:
            pool.close()


def test_adapters_evicted_lru_and_still_exact(family_ws, references):
    """With room for one adapter, the two children take turns in the bank and stay exact."""
    prompts, refs = references
    p = ModelPool(family_ws, ServeConfig(max_batch=8, max_adapters=1))
    try:
        for _ in range(2):
            for m in ("en/software", "en/software/python"):
                seqs, _ = run_sequences(p, [(m, prompts[0], _greedy())])
                assert seqs[0].generated == refs[m, 0]
        # Both at once: one waits for the other's adapter to be released.
        seqs, _ = run_sequences(p, [("en/software", prompts[1], _greedy()),
                                    ("en/software/python", prompts[1], _greedy())])
        assert [s.generated for s in seqs] == [refs["en/software", 1], refs["en/software/python", 1]]
        assert len(p.engines[p.resolve("en").base_id].adapters) == 1
    finally:
        p.close()


def test_more_requests_than_slots_join_as_slots_free(family_ws, references):
    prompts, refs = references
    p = ModelPool(family_ws, ServeConfig(max_batch=3))
    try:
        jobs = [(m, prompts[i % len(prompts)], _greedy()) for i, m in enumerate(["en", "en/software"] * 6)]
        seqs, _ = run_sequences(p, jobs)
        for (m, _, _), s, i in zip(jobs, seqs, range(len(jobs))):
            assert s.generated == refs[m, i % len(prompts)]
    finally:
        p.close()


def test_stop_strings_cut_text_and_never_leak(pool, references):
    prompts, _ = references
    (full,), (evs,) = run_sequences(pool, [("en", prompts[0], _greedy(ignore_eos=True))])
    text = "".join(e.text for e in evs)
    assert text and evs[-1].finish_reason == "length"
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    (s,), (evs,) = run_sequences(pool, [("en", prompts[0], _greedy(ignore_eos=True, stop=(stop,)))])
    got = "".join(e.text for e in evs)
    assert got == text[: text.index(stop)]
    assert evs[-1].finish_reason == "stop"


def test_seeded_sampling_is_reproducible(pool, references):
    prompts, _ = references
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
    a, _ = run_sequences(pool, [("en/software", prompts[0], params)])
    # The same seed in a different batch composition gives the same tokens.
    b, _ = run_sequences(pool, [("en", prompts[1], _greedy()), ("en/software", prompts[0], params)])
    assert a[0].generated == b[1].generated
    c, _ = run_sequences(pool, [("en/software", prompts[0], SamplingParams(max_tokens=16, temperature=1.0, seed=8,
                                                                           ignore_eos=True))])
    assert len(c[0].generated) == 16


def test_cancelled_sequence_frees_its_slot(pool, references):
    from stemma.serve.engine import Sequence

    prompts, _ = references
    t = pool.resolve("en/software")
    engine = pool.engine(t)
    got = []
    s = Sequence(prompt=prompts[0], params=_greedy(n=30, ignore_eos=True), adapter=t.adapters, sink=got.append)
    s.cancel()
    engine.submit([s])
    pool.scheduler.notify()
    _wait_idle(engine)
    assert not engine.has_work()
    assert not any(e.done for e in got) and len(s.generated) < 30


def test_lora_conversion_refuses_unsupported_adapters(family_ws):
    """Each projection's delta lands in its decoder linear (Llama's q/k/v in the fused qkv: three ranks, B zero
    outside each projection's columns); DoRA, rsLoRA, patterns and non-block modules are refused."""
    import functools
    import json

    from safetensors.torch import load_file

    from stemma.errors import StemmaError
    from stemma.models import families
    from stemma.models.families.serving import ATTN_OUT, LINEARS, MLP_DOWN, MLP_UP, QKV
    from stemma.serve.lora import lora_from_peft

    v = family_ws.resolve_version("en/software")
    files = v.manifest["files"]
    cfg = json.loads(family_ws.store.get_bytes(files["adapter_config.json"]))
    tensors = load_file(str(family_ws.store.verified_path(files["adapter_model.safetensors"])))
    config = family_ws.load_model(v.row.parent_id).config
    family = families.checked(config)
    shape, site = family.decoder_shape(config), functools.partial(family.lora_site, config=config)
    delta = lora_from_peft(tensors, cfg, shape, site)
    r = cfg["r"]
    assert set(delta.parts) == {(layer, n) for layer in range(shape.n_layer) for n in LINEARS}
    fused = shape.positions == "rope"  # the Llama tree: q/k/v and gate/up are fused in the decoder
    expect = {QKV: 3 * r, ATTN_OUT: r, MLP_UP: 2 * r, MLP_DOWN: r} if fused else dict.fromkeys(LINEARS, r)
    assert delta.ranks() == expect
    if fused:
        # One part per projection, each B only as wide as its projection (no zero padding to the fused width).
        q, kv = shape.n_head * shape.head_dim, shape.n_kv_head * shape.head_dim
        parts = delta.parts[(0, QKV)]
        assert [(p.column, p.b.shape[1]) for p in parts] == [(0, q), (q, kv), (q + kv, kv)]
        assert all(p.a.shape == (shape.n_embd, r) and p.b.shape[0] == r and p.b.abs().max() > 0 for p in parts)
        assert [(p.column, p.b.shape[1]) for p in delta.parts[(0, MLP_UP)]] == [(0, shape.n_inner),
                                                                              (shape.n_inner, shape.n_inner)]
    for bad in ({"use_dora": True}, {"use_rslora": True}, {"rank_pattern": {"c_fc": 4}}):
        with pytest.raises(StemmaError):
            lora_from_peft(tensors, {**cfg, **bad}, shape, site)
    with pytest.raises(StemmaError):
        lora_from_peft({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 64)}, cfg, shape, site)


def test_scheduler_runs_tensor_work_on_its_own_thread():
    import threading

    from stemma.serve.engine import Scheduler

    sched = Scheduler()
    try:
        assert sched.call(lambda: threading.current_thread()) is sched.thread
        assert sched.call(lambda: sched.call(lambda: 41) + 1) == 42  # a call from the thread itself runs inline
        with pytest.raises(ValueError, match="bad"):
            sched.call(lambda: (_ for _ in ()).throw(ValueError("bad")))
    finally:
        sched.stop()
    with pytest.raises(StemmaError, match="shutting down"):
        sched.call(lambda: 1)
