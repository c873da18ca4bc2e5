"""`pretrain`: train the tree's tokenizer and a decoder of a registered family (``arch``) from scratch on the master's
data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..errors import SpecError, StemmaError
from ..models import families
from ..models.arch import count_params
from ..models.families import ArchConfig
from ..models.io import save_model_files
from ..models.tokenizer import TokenizerConfig, eos_id, tokenizer_from_bytes, tokenizer_to_bytes, train_tokenizer
from ..store import sha256_bytes
from .base import TokenStream, TrainConfig, Trainer, lm_loss
from .parallel import ONE, World
from .registry import BuildContext, BuildMethod, BuildOutput, Planned, register


@dataclass(frozen=True)
class PretrainConfig(TrainConfig, ArchConfig):
    """A master trained from scratch: the decoder's shape (`ArchConfig`), training, and the tokenizer."""

    vocab_size: int = 4096
    """Size of the byte-level BPE vocabulary trained on the master's data."""
    tokenizer_min_frequency: int = 2
    """Minimum pair frequency for a BPE merge."""

    @property
    def shape(self) -> ArchConfig:
        """The decoder's shape alone."""
        return ArchConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(ArchConfig)})


def pretrain_model(model, stream: TokenStream, cfg: TrainConfig, work_dir=None, reporter=None, label="pretrain",
                   world: World = ONE):
    """Next-token training of ``model`` on ``stream``, this process's share of each batch in a ``world`` of several
    (also used by the throughput benchmark)."""
    net = world.wrap(model)

    def step_loss(step: int):
        batch = world.share(stream.batch(step, cfg.batch_size))
        logits = net(input_ids=batch[:, :-1]).logits
        return lm_loss(logits, batch[:, 1:]), batch[:, 1:].numel()

    return Trainer(net, cfg, step_loss, work_dir=work_dir, reporter=reporter, label=label, world=world).run()


@register
class Pretrain(BuildMethod):
    name = "pretrain"
    relation = "pretrain"
    config_cls = PretrainConfig
    root = True
    data_parallel = True

    def make_config(self, raw, where):
        """The config, with the family and the shape checked here (pre-flight), not after the tokenizer trained."""
        cfg = super().make_config(raw, where)
        try:
            fam = families.get(cfg.arch)
            cfg.shape.check()
            fam.check(fam.hf_config(cfg.shape, cfg.vocab_size, 0))
        except StemmaError as e:
            raise SpecError(f"{where}: {e}") from None
        return cfg

    def plan(self, cfg: PretrainConfig, parent, spec, node) -> Planned:
        return Planned(families.get(cfg.arch).hf_config(cfg.shape, cfg.vocab_size, 0))

    def run(self, ctx: BuildContext, cfg: PretrainConfig) -> BuildOutput:
        texts = ctx.texts("train")
        tok_path = ctx.work_dir / "tokenizer.json"
        # The tokenizer is part of the checkpoint: a resumed build must not retrain (and perturb) it. Rank 0 trains
        # it; the other ranks read the file it writes.
        if ctx.world.is_main and not tok_path.exists():
            with ctx.reporter.task(f"{ctx.node}: tokenizer (BPE, {cfg.vocab_size} tokens)", total=None):
                tok = train_tokenizer(texts, TokenizerConfig(cfg.vocab_size, cfg.tokenizer_min_frequency))
            tok_path.write_bytes(tokenizer_to_bytes(tok))
        ctx.world.barrier()
        tok_bytes = tok_path.read_bytes()
        tok = tokenizer_from_bytes(tok_bytes)
        tok_digest = ctx.ws.store.put_bytes(tok_bytes) if ctx.world.is_main else sha256_bytes(tok_bytes)
        torch.manual_seed(cfg.seed)
        family = families.get(cfg.arch)
        model = family.build(cfg.shape, vocab_size=tok.get_vocab_size(), eos_token_id=eos_id(tok))
        stream = TokenStream.from_texts(tok, texts, cfg.context, cfg.seed, name=f"dataset of {ctx.node}")
        stats = pretrain_model(model, stream, cfg, ctx.work_dir, ctx.reporter, label=f"{ctx.node}: pretrain",
                               world=ctx.world)
        n = count_params(model)
        return BuildOutput(
            files=save_model_files(model), tokenizer=tok_digest, params=n, own_params=n,
            architecture=family.describe(model.config),
            train={**stats.record(), "corpus_tokens": int(stream.tokens.numel())},
        )
