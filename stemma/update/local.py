"""`stemma update train`: learn an update on local data, against one version of a node, without sending the data.

The contributor's documents are split by hash into a training part and a held-out part. A LoRA adapter is
trained on the version (its own chain merged) and sent as the dense change of the weights it touches
(``merged - base``); a ``full`` update trains every weight and sends the difference. A held-out sample of
token ids travels with the update (``share_heldout``) so the parent's gate can check the claim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..data.ingest import IngestOptions, build_dataset, read_docs
from ..errors import StemmaError
from ..models import families
from ..models.arch import model_context
from ..progress import NullReporter, Reporter
from ..train.base import TokenStream, TrainConfig, Trainer, encode_corpus, kl_to_teacher, lm_loss
from ..workspace import VersionInfo, Workspace
from . import bundle


@dataclass(frozen=True)
class LocalTrainConfig(TrainConfig):
    """How a contributor trains an update on its own data."""

    steps: int = 60
    """Optimiser steps."""
    batch_size: int = 8
    """Sequences per step."""
    lr: float = 2e-3
    """Peak learning rate."""
    warmup: int = 5
    """Linear warm-up steps."""
    kind: Literal["lora", "full"] = "lora"
    """``lora``: train a low-rank adapter and send its dense product; ``full``: train every weight."""
    r: int = 8
    """Adapter rank (``lora``)."""
    alpha: int = 16
    """Adapter scaling numerator (``lora``)."""
    kl_to_parent: float = 0.0
    """Weight of KL(parent || local) on the local batches: keeps the update close to what the parent predicts."""
    heldout_fraction: float = 0.2
    """Share of local documents kept out of training (chosen by hash of the text)."""
    share_heldout: bool = True
    """Send token ids of the held-out documents with the update, for the parent's gate."""
    max_heldout_tokens: int = 8192
    """At most this many held-out tokens travel with the update."""


def local_texts(path: Path, heldout_fraction: float) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, held-out) documents of a local corpus (text, directory or JSONL), deduplicated."""
    if not 0 < heldout_fraction < 0.5:
        raise StemmaError("heldout_fraction must be in (0, 0.5)")
    built = build_dataset([Path(path)], IngestOptions(name="local", test_fraction=heldout_fraction))
    train = tuple(d["text"] for d in read_docs(built.train))
    held = tuple(d["text"] for d in read_docs(built.test))
    if not held:
        held, train = train[-1:], train[:-1]
    if not train:
        raise StemmaError(f"{path}: too few documents to keep a held-out part; add data")
    return train, held


def dense_delta(base_sd: dict[str, torch.Tensor], model: torch.nn.Module, names: list[str] | None = None
                ) -> dict[str, torch.Tensor]:
    """``model``'s weights minus ``base_sd`` for every tensor that changed (tied weights once)."""
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    seen: set[int] = set()
    for k in names or list(sd):
        v = sd[k]
        if v.data_ptr() in seen or not v.is_floating_point():
            continue
        seen.add(v.data_ptr())
        d = (v.float() - base_sd[k].float())
        if bool((d != 0).any()):
            out[k] = d.contiguous()
    return out


def train_update(ws: Workspace, version: VersionInfo, train: tuple[str, ...], heldout: tuple[str, ...],
                 cfg: LocalTrainConfig, reporter: Reporter | None = None, work_dir: Path | None = None
                 ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, dict]:
    """Train locally; returns (dense delta, held-out ids or None, stats)."""
    reporter = reporter or NullReporter()
    tok = ws.tokenizer(version.row.tokenizer)
    model = ws.load_model(version.id)
    context = model_context(model)
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(cfg.seed)
    stream = TokenStream.from_texts(tok, train, context, cfg.seed, name="local training data")
    teacher = None
    if cfg.kind == "lora":
        from peft import LoraConfig, get_peft_model

        family = families.of(model.config)
        peft_model = get_peft_model(model, LoraConfig(r=cfg.r, lora_alpha=cfg.alpha,
                                                      target_modules=list(family.lora_targets),
                                                      fan_in_fan_out=family.lora_fan_in_fan_out, bias="none",
                                                      task_type="CAUSAL_LM"))
        train_model = peft_model
    else:
        train_model = model
        if cfg.kl_to_parent > 0:
            teacher = ws.load_model(version.id)

    def step_loss(step: int):
        b = stream.batch(step, cfg.batch_size)
        logits = train_model(input_ids=b[:, :-1]).logits
        loss = lm_loss(logits, b[:, 1:])
        if cfg.kl_to_parent > 0:
            with torch.no_grad():
                if cfg.kind == "lora":
                    with train_model.disable_adapter():
                        p = train_model(input_ids=b[:, :-1]).logits
                else:
                    p = teacher(input_ids=b[:, :-1]).logits
            loss = loss + cfg.kl_to_parent * kl_to_teacher(logits, p)
        return loss, b[:, 1:].numel()

    stats = Trainer(train_model, cfg, step_loss, work_dir, reporter,
                    label=f"local update of {version.row.node_path} ({cfg.kind})").run()
    if cfg.kind == "lora":
        model = train_model.merge_and_unload()
    delta = dense_delta(base_sd, model)
    held = None
    if cfg.share_heldout:
        held = encode_corpus(tok, heldout)[: cfg.max_heldout_tokens]
    return delta, held, {"steps": stats.steps, "tokens": stats.tokens, "seconds": round(stats.seconds, 2),
                         "final_loss": round(stats.final_loss, 4)}


def make_update(ws: Workspace, node_ref: str, data: Path, key_path: Path, contributor: str, out: Path,
                cfg: LocalTrainConfig, reporter: Reporter | None = None) -> tuple[Path, dict]:
    """Train on ``data`` against the node's current version (or ``node@version``) and write a signed update."""
    from .keys import load_private

    key = load_private(key_path)  # fail before training, not after
    out = Path(out)
    if not out.parent.is_dir():
        raise StemmaError(f"{out.parent}: no such directory")
    version = ws.resolve_version(node_ref)
    train, held = local_texts(data, cfg.heldout_fraction)
    delta, held_ids, stats = train_update(ws, version, train, held, cfg, reporter)
    header = bundle.make_header(node=version.row.node_path, parent=version.id, tokenizer=version.row.tokenizer,
                                contributor=contributor, kind=cfg.kind, n_examples=len(train),
                                n_tokens=stats["tokens"], extra={"train": stats})
    bundle.write(out, bundle.encode(header, delta, held_ids, key))
    return out, header
