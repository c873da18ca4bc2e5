import pytest
import torch

from stemma.models import families
from stemma.models.families import ArchConfig
from stemma.train.base import TokenStream, TrainConfig, Trainer, kl_to_teacher, lm_loss, lr_at


def _setup(tmp_path, steps=12):
    torch.manual_seed(0)
    model = families.get("gpt2").build(ArchConfig(n_layer=1, n_embd=32, n_head=2, context=16), vocab_size=50,
                                        eos_token_id=0)
    stream = TokenStream(torch.randint(0, 50, (2000,)), context=16, seed=3)
    cfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup=2, checkpoint_every_s=0.0)

    def step_loss(step):
        b = stream.batch(step, cfg.batch_size)
        return lm_loss(model(input_ids=b[:, :-1]).logits, b[:, 1:]), b[:, 1:].numel()

    return model, cfg, step_loss


def test_resumed_training_equals_uninterrupted(tmp_path):
    """Kill the loop mid-run, resume from its checkpoint: the weights equal an uninterrupted run's, bit for bit."""
    ref_model, cfg, ref_loss = _setup(tmp_path)
    Trainer(ref_model, cfg, ref_loss).run()

    model, cfg, step_loss = _setup(tmp_path)

    def dying(step):
        if step == 7:
            raise KeyboardInterrupt
        return step_loss(step)

    with pytest.raises(KeyboardInterrupt):
        Trainer(model, cfg, dying, work_dir=tmp_path).run()
    model2, cfg, step_loss2 = _setup(tmp_path)
    stats = Trainer(model2, cfg, step_loss2, work_dir=tmp_path).run()
    assert stats.resumed_from == 7
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n


def test_batches_are_a_function_of_seed_and_step():
    s = TokenStream(torch.arange(1000), context=8, seed=1)
    assert torch.equal(s.batch(5, 3), s.batch(5, 3))
    assert not torch.equal(s.batch(5, 3), s.batch(6, 3))
    b = s.batch(0, 2)
    assert torch.equal(b[:, 1:] - b[:, :-1], torch.ones(2, 8, dtype=torch.long))


def test_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_kl_is_zero_for_identical_logits_and_positive_otherwise():
    a = torch.randn(2, 3, 10)
    assert kl_to_teacher(a, a).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_to_teacher(a, a.flip(-1)).item() > 0


def test_precision_auto_becomes_what_this_machine_computes_natively():
    import stemma.methods  # noqa: F401  (registers the built-in methods)
    from stemma.train.base import native_bf16, resolve_precision
    from stemma.train.registry import get

    want = "bf16" if native_bf16() else "fp32"
    assert resolve_precision("auto") == want
    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    # The recipe names the precision that trains, never "auto": the two train different weights.
    cfg = get("lora").make_config({"precision": "auto"}, "node x")
    assert cfg.precision == want
    assert get("lora").recipe_config(cfg)["precision"] == want


def test_bf16_without_native_support_is_reported(monkeypatch):
    import stemma.train.base as base

    logged = []

    class Rec:
        def log(self, message):
            logged.append(message)

    monkeypatch.setattr(base, "native_bf16", lambda: False)
    model = torch.nn.Linear(4, 4)
    base.Trainer(model, base.TrainConfig(precision="bf16"), lambda s: (model.weight.sum(), 1), reporter=Rec(),
                 label="n")
    assert any("precision bf16" in m and "fp32" in m for m in logged)
    logged.clear()
    base.Trainer(model, base.TrainConfig(precision="auto"), lambda s: (model.weight.sum(), 1), reporter=Rec(),
                 label="n")
    assert not logged  # auto picked fp32
