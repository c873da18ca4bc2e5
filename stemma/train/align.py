"""What the alignment methods `sft` and `dpo` share: pairs files, the chat transcript, response-only labels,
the model being aligned and its frozen reference (the parent), and the forgetting control.

A pairs file is JSONL, one example per line. `sft` reads ``{"prompt", "response"}`` or chat ``{"messages": [{"role",
"content"}, ...]}``; `dpo` reads ``{"prompt", "chosen", "rejected"}``. The file is a method input like an imported
checkpoint: its content hash enters the recipe (editing it rebuilds the node, moving it does not), and it is
read and checked in the build's pre-flight, so a missing field or an empty file fails in one line before anything
trains.

Examples are rendered as the transcript `stemma serve` gives a chat request (`stemma.serve.api.chat_prompt`):
``User: {prompt}\\nAssistant:`` followed by `` {response}`` and the end-of-text token, so an aligned node answers
through ``/v1/chat/completions`` the way it was trained. Prompt and response are tokenized separately, so the
boundary is exact: labels are the token ids on the response (and its end-of-text token) and -100 on everything
else (the loss is on responses only, as in InstructGPT; Ouyang et al., 2022).

A share of the pairs is held out by the hash of the prompt text (as dataset splits are by the hash of a document),
so the same prompt is held out of every pairs file that uses the same share: a DPO child's held-out questions are
held out of its SFT parent too.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..errors import DataError, SpecError
from ..models import families
from ..models.arch import count_params, model_context
from ..models.io import save_model_files
from ..models.tokenizer import eos_id
from ..store import sha256_file
from .base import TokenStream, TrainConfig, kl_to_teacher, resolve_precision
from .forgetting import L2SP
from .registry import BuildContext, BuildMethod, BuildOutput

IGNORE = -100
"""Label of a token the loss skips (PyTorch's ``cross_entropy`` default ``ignore_index``)."""

FIELDS = {"sft": ("prompt", "response"), "dpo": ("prompt", "chosen", "rejected")}
ROLES = ("system", "developer", "user", "assistant")


@dataclass(frozen=True)
class AlignConfig(TrainConfig):
    """Settings `sft` and `dpo` share: the pairs, LoRA or all weights, and the forgetting control."""

    pairs: str = ""
    """The pairs file (JSONL); a relative path is resolved against the directory of stemma.yaml. Required. Only its
    content enters the recipe."""
    mode: Literal["lora", "full"] = "lora"
    """``lora``: a PEFT LoRA adapter on the parent, stored alone (relation ``adapter``, as `lora`); ``full``: every
    weight of a copy of the parent (relation ``finetune``)."""
    template: Literal["chat", "plain"] = "chat"
    """``chat``: prompt and response as the serving transcript (``User: ...`` / ``Assistant: ...``); ``plain``: the
    prompt text followed directly by the response text. Chat ``messages`` always use the transcript."""
    heldout_fraction: float = 0.1
    """Share of the pairs held out of training, chosen by the hash of the prompt, to measure the result."""
    lr: float = 1e-3
    """Peak learning rate (about 2e-3 suits an adapter, 3e-4 all weights)."""
    warmup: int = 5
    """Linear warm-up steps (alignment runs are short)."""
    r: int = 8
    """LoRA rank (``mode: lora``)."""
    alpha: int = 16
    """LoRA scaling numerator: the update is multiplied by ``alpha / r`` (``mode: lora``)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (``mode: lora``)."""
    target_modules: list[str] | None = None
    """Modules to adapt (``mode: lora``); default: every attention and MLP projection of the model's family."""
    replay_fraction: float = 0.25
    """Share of each batch drawn as text windows from the parent's training data (else the node's dataset)."""
    replay_kl: float = 1.0
    """Weight of KL(parent || child) on the replay rows (Li & Hoiem, 2016, with replay); 0 disables replay."""
    l2sp: float = 0.0
    """Weight of the L2-SP penalty pulling the trained weights towards their start (Li et al., 2018)."""


@dataclass
class AlignStart:
    train: list[dict]
    held: list[dict]
    digest: str
    """sha256 of the pairs file."""
    tok: Any
    eos: int
    policy: Policy
    context: int


class AlignMethod(BuildMethod):
    """A build method trained on a pairs file: LoRA or full by config, the pairs file hashed into the recipe."""

    kind: str
    relation = "adapter"
    needs_dataset = False
    """The pairs are the training data; a node's `dataset`, if given, is the text it serves (its perplexity is
    measured there, and its children replay on it) and the replay source when the parent has no data."""

    def make_config(self, raw: dict[str, Any] | None, where: str) -> AlignConfig:
        cfg = super().make_config(raw, where)
        where = f"{where} (method {self.name})"
        if not cfg.pairs:
            raise SpecError(f"{where}: config field pairs is required (a JSONL file of {self.describe_fields()})")
        if not 0 <= cfg.heldout_fraction < 0.5:
            raise SpecError(f"{where}: heldout_fraction must be in [0, 0.5)")
        if cfg.r < 1 or not 0 <= cfg.replay_fraction < 1 or cfg.replay_kl < 0 or cfg.l2sp < 0:
            raise SpecError(f"{where}: needs r >= 1, 0 <= replay_fraction < 1, replay_kl >= 0, l2sp >= 0")
        return cfg

    def describe_fields(self) -> str:
        f = FIELDS[self.kind]
        return "{" + ", ".join(f'"{x}"' for x in f) + "}" + (' or {"messages"}' if self.kind == "sft" else "")

    def relation_for(self, cfg: AlignConfig) -> str:
        return "adapter" if cfg.mode == "lora" else "finetune"

    def plan(self, cfg: AlignConfig, parent, spec, node):
        planned = super().plan(cfg, parent, spec, node)  # refuses an adapter on a compressed parent first
        if cfg.mode == "lora" and parent is not None and parent.config is not None:
            from .lora import check_lora

            check_lora(parent.config, cfg.r, cfg.target_modules, f"node {node.path}")
        return planned

    def can_rebase(self, cfg: AlignConfig) -> bool:
        return False  # a rebase re-fits on the node's text; these methods learn from pairs

    def recipe_config(self, cfg: AlignConfig) -> dict[str, Any]:
        d = super().recipe_config(cfg)
        d.pop("pairs")  # the path only locates the file; its content (recipe_inputs) identifies it
        return d

    def recipe_inputs(self, cfg: AlignConfig, spec_dir: Path) -> dict[str, Any]:
        path = resolve(cfg.pairs, spec_dir)
        records = read_pairs(path, self.kind)
        train, held = split_pairs(records, cfg.heldout_fraction, cfg.template)
        if not train:
            raise DataError(f"{path}: all {len(records)} pairs fall in the held-out share; add pairs or lower "
                            "heldout_fraction")
        return {"pairs": {"sha256": sha256_file(path), "n": len(records), "heldout": len(held)}}

    def start(self, ctx: BuildContext, cfg: AlignConfig) -> AlignStart:
        """What `sft` and `dpo` both begin with: the pairs split, the parent's tokenizer, the trainable policy."""
        train, held, digest = self.load_pairs(ctx, cfg)
        tok = ctx.parent_tokenizer()
        policy = Policy(ctx, cfg, need_reference=cfg.replay_kl > 0 and cfg.replay_fraction > 0)
        return AlignStart(train, held, digest, tok, eos_id(tok), policy, model_context(policy.model))

    def load_pairs(self, ctx: BuildContext, cfg: AlignConfig) -> tuple[list[dict], list[dict], str]:
        """(training pairs, held-out pairs, the file's sha256)."""
        path = resolve(cfg.pairs, ctx.spec_dir)
        records = read_pairs(path, self.kind)
        train, held = split_pairs(records, cfg.heldout_fraction, cfg.template)
        return train, held, sha256_file(path)


# ------------------------------------------------------------------------------------------------ pairs files
def resolve(path: str, spec_dir: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(spec_dir) / p


def read_pairs(path: Path, kind: str) -> list[dict]:
    """Every example of a pairs file, checked: one-line errors naming the file, the line and the field."""
    if not path.is_file():
        raise DataError(f"{path}: no such pairs file")
    records = []
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{i}"
            try:
                rec = json.loads(raw)
            except ValueError as e:  # bad JSON and invalid UTF-8 alike
                raise DataError(f"{where}: not a JSON line ({str(e).splitlines()[0]})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            records.append(check_record(rec, kind, where))
    if not records:
        raise DataError(f"{path}: no pairs (the file is empty)")
    return records


def check_record(rec: dict, kind: str, where: str) -> dict:
    if kind == "sft" and "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: messages must be a non-empty list")
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not _text(m.get("content")):
                raise DataError(f"{where}: messages[{j}] needs a role ({', '.join(ROLES)}) and non-empty content")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: messages must end with an assistant message (the response to learn)")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}
    need = FIELDS[kind]
    for name in need:
        if name not in rec:
            also = " (or messages)" if kind == "sft" else ""
            raise DataError(f"{where}: missing field {name!r} (a {kind} pair needs {', '.join(need)}{also})")
        if not _text(rec[name]):
            raise DataError(f"{where}: field {name!r} must be a non-empty string")
    if kind == "dpo" and rec["chosen"].strip() == rec["rejected"].strip():
        raise DataError(f"{where}: chosen and rejected are the same text")
    return {k: rec[k] for k in need}


def _text(x) -> bool:
    return isinstance(x, str) and bool(x.strip())


def heldout(key: str, fraction: float) -> bool:
    """True for the held-out share: the first 64 bits of sha256(key) below ``fraction`` of their range."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") < fraction * 2**64


def split_pairs(records: list[dict], fraction: float, template: str) -> tuple[list[dict], list[dict]]:
    train, held = [], []
    for r in records:
        (held if heldout(prompt_key(r, template), fraction) else train).append(r)
    return train, held


# ------------------------------------------------------------------------------------------------ rendering
def prompt_text(prompt: str, template: str) -> str:
    """What precedes a response: the serving transcript's user turn, or the prompt as written."""
    return f"User: {prompt.strip()}\nAssistant:" if template == "chat" else prompt


def response_text(response: str, template: str) -> str:
    return f" {response.strip()}" if template == "chat" else response


def prompt_key(rec: dict, template: str) -> str:
    """The text a held-out split is decided by: the prompt as rendered (for messages, all but the last answer)."""
    if "messages" in rec:
        return "".join(text for text, _ in render_messages(rec["messages"])[:-1])
    return prompt_text(rec["prompt"], template)


def render_sft(rec: dict, template: str) -> list[tuple[str, bool]]:
    """An SFT example as (text, trained) segments; the end-of-text token is added when encoding."""
    if "messages" in rec:
        return render_messages(rec["messages"])
    return [(prompt_text(rec["prompt"], template), False), (response_text(rec["response"], template), True)]


def render_messages(msgs: list[dict]) -> list[tuple[str, bool]]:
    """A chat as the serving transcript; every assistant turn is trained (its line break ends the turn)."""
    out: list[tuple[str, bool]] = []
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    for i, m in enumerate(msgs):
        text = m["content"].strip()
        if m["role"] in ("system", "developer"):
            out.append((f"{text}\n\n", False))
        elif m["role"] == "user":
            out.append((f"User: {text}\n", False))
        else:
            out.append(("Assistant:", False))
            out.append((f" {text}" + ("" if i == last else "\n"), True))
    return out


# ------------------------------------------------------------------------------------------------ tokens
def encode(tok, segments: list[tuple[str, bool]], eos: int, max_len: int) -> tuple[list[int], list[int], bool]:
    """(token ids, labels, truncated): labels equal the ids on trained segments and the final end-of-text token,
    and are `IGNORE` elsewhere. At most ``max_len`` tokens: the prompt loses its start first, then the response
    its end."""
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in segments:
        t = tok.encode(text, add_special_tokens=False).ids
        ids += t
        labels += t if trained else [IGNORE] * len(t)
    ids.append(eos)
    labels.append(eos)
    if len(ids) <= max_len:
        return ids, labels, False
    first = next(i for i, x in enumerate(labels) if x != IGNORE)
    # Keep at least one token before the first trained one: it is the input that predicts it.
    start = max(0, min(len(ids) - max_len, first - 1))
    return ids[start : start + max_len], labels[start : start + max_len], True


def collate(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels); padding comes after every real token, so a causal model needs no mask."""
    n = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    for i, (a, b) in enumerate(rows):
        ids[i, : len(a)] = torch.tensor(a)
        labels[i, : len(b)] = torch.tensor(b)
    return ids, labels


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each next labelled token, 0 where the label is `IGNORE`: [rows, len - 1]."""
    targets = labels[:, 1:]
    return -torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE,
                                              reduction="none")


def pick(n: int, k: int, seed: int, step: int) -> np.ndarray:
    """``k`` distinct example indices for one step, drawn from (seed, step) so a resumed run sees the same ones."""
    return np.random.default_rng([seed, 0, step]).choice(n, size=min(k, n), replace=False)


# ------------------------------------------------------------------------------------------------ the model
class Policy:
    """The parent made trainable (a fresh LoRA adapter, or all weights) and a view of the parent as it was.

    With LoRA the parent is the same model with the adapter disabled (no second copy in memory); with all weights
    a frozen copy is kept only when something asks for the parent during training (``need_reference``). ``net`` is
    the model as training calls it: wrapped for the build's processes when the method trains data-parallel.
    """

    def __init__(self, ctx: BuildContext, cfg: AlignConfig, need_reference: bool):
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        self.ctx, self.cfg = ctx, cfg
        base = ctx.load_parent()
        self.family = families.of(base.config)
        self.n_base = count_params(base)
        self.targets = list(cfg.target_modules or self.family.lora_targets)
        self._ref = None
        torch.manual_seed(cfg.seed)
        if cfg.mode == "lora":
            peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                      target_modules=self.targets, fan_in_fan_out=self.family.lora_fan_in_fan_out,
                                      bias="none", task_type="CAUSAL_LM")
            self.model = get_peft_model(base, peft_cfg)
        else:
            self.model = base
            for p in base.parameters():
                p.requires_grad_(True)
            if need_reference:
                self._ref = copy.deepcopy(base).eval()
                for p in self._ref.parameters():
                    p.requires_grad_(False)
        self.l2sp = L2SP(self.model.named_parameters()) if cfg.l2sp > 0 else None
        self.net = ctx.world.wrap(self.model)

    @contextmanager
    def reference(self):
        """The parent's model, for computing under ``torch.no_grad()``."""
        if self.cfg.mode == "lora":
            with self.model.disable_adapter():
                yield self.model
        elif self._ref is not None:
            yield self._ref
        else:
            raise RuntimeError("the parent was not kept: construct the Policy with need_reference=True")

    def replay_stream(self, tok, context: int) -> TokenStream | None:
        """Text windows for the forgetting control: the parent's training data, else the node's own dataset."""
        ctx = self.ctx
        ds = ctx.replay_dataset_id or ctx.dataset_id
        if ds is None or self.cfg.replay_kl <= 0 or self.cfg.replay_fraction <= 0:
            return None
        return TokenStream.from_texts(tok, ctx.texts("train", ds), context, self.cfg.seed,
                                      name=f"replay data of {ctx.node}")

    def replay_loss(self, rows: torch.Tensor) -> torch.Tensor:
        """KL(parent || child) on text windows (the child's general knowledge kept where the parent had it)."""
        logits = self.net(input_ids=rows[:, :-1]).logits
        with torch.no_grad(), self.reference() as ref:
            p_logits = ref(input_ids=rows[:, :-1]).logits
        return self.cfg.replay_kl * kl_to_teacher(logits, p_logits)

    def regularise(self, loss: torch.Tensor) -> torch.Tensor:
        return loss if self.l2sp is None else loss + self.cfg.l2sp * self.l2sp()

    def step_total(self, loss: torch.Tensor, ntok: int, step: int, replay: TokenStream | None, n_replay: int
                   ) -> tuple[torch.Tensor, int]:
        """A step's loss on its pairs plus the replay KL on ``n_replay`` text windows (this process's share of them)
        and the L2-SP penalty."""
        if n_replay:
            rows = self.ctx.world.share(replay.batch(step, n_replay, stream=1))
            loss = loss + self.replay_loss(rows)
            ntok += rows[:, 1:].numel()
        return self.regularise(loss), ntok

    @staticmethod
    def train_info(stats, digest: str, n_train: int, n_heldout: int) -> dict[str, Any]:
        """What every alignment run records in the manifest."""
        return {**stats.record(), "pairs": digest, "train_pairs": n_train, "heldout_pairs": n_heldout}

    def no_grad_eval(self):
        """Evaluation mode without gradients (dropout off), for measuring before and after training."""
        self.model.eval()
        return torch.no_grad()

    def output(self, train: dict[str, Any], metrics: dict | None = None) -> BuildOutput:
        ctx, cfg = self.ctx, self.cfg
        arch = ctx.parent.manifest["architecture"]
        if cfg.mode == "lora":
            delta = sum(p.numel() for n, p in self.model.named_parameters() if "lora_" in n)
            return BuildOutput(
                files=save_model_files(self.model, adapter=True, base_ref=f"stemma:{ctx.parent.id}"),
                tokenizer=ctx.parent.row.tokenizer, params=self.n_base, own_params=delta,
                architecture={**arch, "adapter": {"type": "lora", "r": cfg.r, "alpha": cfg.alpha,
                                                  "targets": self.targets}},
                train=train, metrics=metrics or {},
            )
        n = count_params(self.model)
        return BuildOutput(files=save_model_files(self.model), tokenizer=ctx.parent.row.tokenizer, params=n,
                           own_params=n, architecture=arch, train=train, metrics=metrics or {})


def maybe_autocast(cfg: TrainConfig):
    """The training precision for measurements outside the `Trainer` loop (the same numbers the loop sees)."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if resolve_precision(cfg.precision) == "bf16" else nullcontext()
