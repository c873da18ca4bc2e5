"""The training loop every build method shares: batching, schedule, clipping, checkpoints, progress.

A method supplies the model's trainable parameters and a ``step_loss(step) -> (loss, tokens)`` function; the
`Trainer` owns everything else (datatrove-style: the plug-in implements one thing). Checkpoints hold the
trainable weights, the optimiser state, the step and the loss curve so far, all as safetensors + JSON, and are
swapped in atomically, so a build killed at any moment resumes from its last checkpoint.

Data-parallel training (`stemma.train.parallel`): the method wraps its trained model with `World.wrap` and calls
the wrapper's forward in ``step_loss`` on its share of the global batch; the Trainer takes the wrapper, reports the
global batch's loss and tokens, and only rank 0 writes checkpoints, which every rank reads when it resumes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..errors import DataError
from ..progress import NullReporter, Reporter
from .parallel import ONE, World, unwrap


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every training method."""

    steps: int = 200
    """Optimiser steps."""
    batch_size: int = 16
    """Sequences per step."""
    lr: float = 1e-3
    """Peak learning rate (AdamW)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule decays to ``lr * min_lr_ratio``."""
    warmup: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay, applied to matrices only."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    seed: int = 0
    """Seeds initialisation and batch sampling; the same seed gives the same batches after a resume."""
    checkpoint_every_s: float = 20.0
    """Write a resumable checkpoint at most this often (seconds)."""
    precision: Literal["fp32", "bf16", "auto"] = "fp32"
    """``fp32``; ``bf16``: forward passes under bfloat16 autocast while weights and optimiser state stay fp32
    (about twice as fast on CPUs with AVX512 or AMX, but on a CPU without them PyTorch emulates bfloat16 matrix
    products at a small fraction of fp32's speed); ``auto``: ``bf16`` where this machine computes it natively, else
    ``fp32``. The precision used (never ``auto``) enters the recipe: the two train different weights."""


def native_bf16() -> bool:
    """Whether bfloat16 matrix products run natively here (oneDNN's check: AVX512 or AMX on the CPU)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def resolve_precision(precision: str) -> str:
    """``auto`` made concrete for this machine; other values as given."""
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    return precision


class TokenStream:
    """A corpus as one long token array; batches are random windows drawn from a per-step seed.

    Drawing from ``(seed, step)`` rather than a running generator makes a resumed run see exactly the batches
    the interrupted one would have seen.
    """

    def __init__(self, tokens: torch.Tensor, context: int, seed: int, name: str = "corpus"):
        if tokens.numel() < context + 2:
            raise DataError(
                f"{name} has {tokens.numel()} tokens, fewer than one training window of {context + 1}; "
                "add data or lower the context"
            )
        self.tokens, self.context, self.seed = tokens, context, seed

    @classmethod
    def from_texts(cls, tok, texts, context: int, seed: int, name: str = "corpus") -> TokenStream:
        return cls(encode_corpus(tok, texts), context, seed, name)

    def batch(self, step: int, batch_size: int, stream: int = 0) -> torch.Tensor:
        """(batch_size, context + 1) token windows: inputs are [:, :-1], targets [:, 1:]."""
        rng = np.random.default_rng([self.seed, stream, step])
        starts = rng.integers(0, self.tokens.numel() - self.context - 1, size=batch_size)
        idx = torch.from_numpy(starts)[:, None] + torch.arange(self.context + 1)[None, :]
        return self.tokens[idx]


def encode_corpus(tok, texts) -> torch.Tensor:
    """Token ids of all documents, each followed by the end-of-text token."""
    from ..models.tokenizer import encode_docs, eos_id

    eos = eos_id(tok)
    ids: list[int] = []
    for doc in encode_docs(tok, list(texts)):
        ids.extend(doc)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


CURVE_POINTS = 200
"""A manifest's loss curve has at most this many points (means of consecutive windows of steps)."""


@dataclass
class TrainStats:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    resumed_from: int
    losses: list[float]
    """The global batch's loss at every step, resumed runs included (the checkpoint carries it)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def record(self) -> dict:
        """What the manifest's ``train`` says of the run: steps, tokens, seconds, the final (smoothed) loss, and the
        loss curve as the mean loss of each window of ``every`` steps (every step for runs of up to
        `CURVE_POINTS` steps)."""
        every = max(1, math.ceil(len(self.losses) / CURVE_POINTS))
        curve = [round(float(np.mean(self.losses[i : i + every])), 6) for i in range(0, len(self.losses), every)]
        return {"steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 2),
                "final_loss": round(self.final_loss, 4), "loss_curve": {"every": every, "loss": curve}}


class Trainer:
    """Runs ``cfg.steps`` optimiser steps of ``step_loss`` over ``module``'s trainable parameters.

    ``module`` is the model ``step_loss`` calls: in a ``world`` of several processes, its `World.wrap` wrapper
    (refused otherwise: unsynchronised gradients would silently train a different model in every process)."""

    def __init__(self, module: torch.nn.Module, cfg: TrainConfig, step_loss: Callable[[int], tuple[torch.Tensor, int]],
                 work_dir: Path | None = None, reporter: Reporter | None = None, label: str = "train",
                 world: World = ONE):
        if world.size > 1 and unwrap(module) is module:
            raise ValueError(f"{label}: training in {world.size} processes needs the model wrapped by World.wrap")
        self.net, self.module = module, unwrap(module)
        self.cfg, self.step_loss, self.world = cfg, step_loss, world
        self.work_dir = Path(work_dir) if work_dir else None
        self.reporter = reporter or NullReporter()
        self.label = label
        self.named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]
        if not self.named:
            raise ValueError("nothing to train: no parameter requires grad")
        precision = resolve_precision(cfg.precision)
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be fp32, bf16 or auto, got {cfg.precision!r}")
        self._autocast = precision == "bf16"
        if self._autocast and not native_bf16():
            self.reporter.log(f"{label}: precision bf16 on a CPU without native bfloat16 (AVX512 or AMX) runs far "
                              "slower than fp32; precision: auto picks fp32 here")
        decay = [p for n, p in self.named if p.dim() >= 2]
        no_decay = [p for n, p in self.named if p.dim() < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95),
        )
        self.params = [p for _, p in self.named]

    # ---------------------------------------------------------------- checkpoints
    @property
    def _ckpt(self) -> Path | None:
        return self.work_dir / "checkpoint" if self.work_dir else None

    def save_checkpoint(self, step: int, tokens: int, loss: float, losses: list[float]) -> None:
        if self._ckpt is None or not self.world.is_main:
            return
        new = self.work_dir / "checkpoint.new"
        old = self.work_dir / "checkpoint.old"
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir(parents=True)
        save_file({n: p.detach().contiguous().clone() for n, p in self.named}, new / "weights.safetensors")
        sd = self.opt.state_dict()
        tensors, scalars = {}, {}
        for idx, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{idx}.{k}"] = v.detach().contiguous().clone()
                else:
                    scalars[f"{idx}.{k}"] = v
        if tensors:
            save_file(tensors, new / "optimizer.safetensors")
        groups = [{k: v for k, v in g.items()} for g in sd["param_groups"]]
        state = {"step": step, "tokens": tokens, "loss": loss, "param_groups": groups, "scalars": scalars,
                 "names": [n for n, _ in self.named], "losses": losses}
        (new / "state.json").write_text(json.dumps(state))
        # Swap in: at every instant either checkpoint/ or checkpoint.old/ is complete.
        shutil.rmtree(old, ignore_errors=True)
        if self._ckpt.exists():
            self._ckpt.rename(old)
        new.rename(self._ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self) -> tuple[int, int, list[float]]:
        """(step, tokens, losses) of the checkpoint, its weights and optimiser state loaded; zeros without one.

        Every rank reads the same files: rank 0 writes them only after a step, which needs every rank's gradients,
        so no rank can read while rank 0 writes."""
        if self._ckpt is None:
            return 0, 0, []
        ck = self._ckpt if (self._ckpt / "state.json").exists() else self.work_dir / "checkpoint.old"
        if not (ck / "state.json").exists():
            return 0, 0, []
        state = json.loads((ck / "state.json").read_text())
        if state["names"] != [n for n, _ in self.named]:
            return 0, 0, []  # a checkpoint of some other parameter set: start over rather than mix
        weights = load_file(ck / "weights.safetensors")
        with torch.no_grad():
            for n, p in self.named:
                p.copy_(weights[n])
        opt_tensors = load_file(ck / "optimizer.safetensors") if (ck / "optimizer.safetensors").exists() else {}
        per: dict[int, dict] = {}
        for key, v in opt_tensors.items():
            idx, k = key.split(".", 1)
            per.setdefault(int(idx), {})[k] = v
        for key, v in state["scalars"].items():
            idx, k = key.split(".", 1)
            per.setdefault(int(idx), {})[k] = v
        self.opt.load_state_dict({"state": per, "param_groups": state["param_groups"]})
        return int(state["step"]), int(state["tokens"]), list(state.get("losses", []))

    # ---------------------------------------------------------------- loop
    def run(self) -> TrainStats:
        cfg = self.cfg
        start, tokens, losses = self.load_checkpoint()
        if start:
            self.reporter.log(f"[dim]{self.label}: resuming from checkpoint at step {start}/{cfg.steps}[/dim]")
        self.net.train()
        t0 = time.perf_counter()
        last_ckpt = t0
        loss_ema = float("nan")
        run_tokens = 0
        with self.reporter.task(self.label, total=cfg.steps) as task:
            if start:
                task.advance(start)
            for step in range(start, cfg.steps):
                lr = lr_at(step, cfg)
                for g in self.opt.param_groups:
                    g["lr"] = lr
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self._autocast):
                    loss, ntok = self.step_loss(step)
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                lv, ntok = self.world.step_totals(loss.item(), ntok)  # the same on every rank
                losses.append(lv)
                if not math.isfinite(lv):
                    raise FloatingPointError(f"{self.label}: loss became {lv} at step {step}; lower the learning rate")
                loss_ema = lv if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * lv
                tokens += ntok
                run_tokens += ntok
                now = time.perf_counter()
                task.advance(1, info=f"loss {loss_ema:.3f}  {run_tokens / max(now - t0, 1e-9):,.0f} tok/s")
                if self.work_dir and now - last_ckpt >= cfg.checkpoint_every_s and step + 1 < cfg.steps:
                    self.save_checkpoint(step + 1, tokens, loss_ema, losses)
                    last_ckpt = time.perf_counter()
        self.net.eval()
        return TrainStats(steps=cfg.steps, tokens=tokens, seconds=time.perf_counter() - t0, final_loss=loss_ema,
                          resumed_from=start, losses=losses)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) at a temperature, scaled by T^2 (Hinton et al., 2015)."""
    t = temperature
    s_log = torch.log_softmax(student_logits.float() / t, dim=-1)
    t_log = torch.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = (t_log.exp() * (t_log - s_log)).sum(-1).mean()
    return kl * (t * t)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
