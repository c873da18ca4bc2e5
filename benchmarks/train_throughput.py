"""Pretraining throughput: stemma's training loop against a plain PyTorch loop, same model, batch and data.

The peer is the loop anyone would write: sample windows, forward, cross-entropy, backward, clip, AdamW step,
with the same cosine schedule. stemma's `Trainer` adds deterministic per-step batch sampling, loss
tracking, a live progress bar and resumable checkpoints; the overhead of all that is what this measures.
Runs alternate (peer, stemma, peer, stemma, ...) so drift in machine speed hits both; medians are reported.

    python benchmarks/train_throughput.py [--family gpt2|llama] [--quick] [--json out.json]
"""

from __future__ import annotations

import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parser, print_table, sample_texts, write_json  # noqa: E402

from stemma.models import families  # noqa: E402
from stemma.models.families import ArchConfig  # noqa: E402
from stemma.models.tokenizer import TokenizerConfig, eos_id, train_tokenizer  # noqa: E402
from stemma.progress import RichReporter  # noqa: E402
from stemma.train.base import TokenStream, TrainConfig, lm_loss, lr_at  # noqa: E402
from stemma.train.pretrain import pretrain_model  # noqa: E402


def peer_loop(model, tokens: torch.Tensor, cfg: TrainConfig, context: int) -> float:
    """A plain PyTorch training loop; returns tokens/s."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0 = time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ix = torch.randint(0, tokens.numel() - context - 1, (cfg.batch_size,), generator=g)
        batch = torch.stack([tokens[i : i + context + 1] for i in ix.tolist()])
        loss = lm_loss(model(input_ids=batch[:, :-1]).logits, batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return cfg.steps * cfg.batch_size * context / (time.perf_counter() - t0)


def stemma_loop(model, tokens: torch.Tensor, cfg: TrainConfig, context: int) -> float:
    stream = TokenStream(tokens, context, cfg.seed)
    reporter = RichReporter(console=__import__("rich.console").console.Console(file=io.StringIO(), width=120))
    with tempfile.TemporaryDirectory() as work:
        stats = pretrain_model(model, stream, cfg, work_dir=Path(work), reporter=reporter)
    return stats.tokens_per_s


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--family", choices=families.names(), default="gpt2",
                    help="model family of the trained decoder (llama: the demo master's shape, 4 KV heads of 8)")
    args = ap.parse_args()
    if args.family == "llama":
        arch = ArchConfig(arch="llama", n_layer=6, n_embd=256, n_head=8, n_kv_head=4, context=128)
    else:
        arch = ArchConfig(arch="gpt2", n_layer=6, n_embd=256, n_head=4, context=128)
    family = families.get(arch.arch)
    steps, rounds = (25, 2) if args.quick else (80, 3)
    tok = train_tokenizer(sample_texts(), TokenizerConfig(vocab_size=4096))
    from stemma.train.base import encode_corpus

    tokens = encode_corpus(tok, sample_texts())
    # The checkpoint interval is the default a user gets; in a long run it costs the same share.
    cfg = TrainConfig(steps=steps, batch_size=16, lr=1e-3, warmup=5, checkpoint_every_s=20.0)
    results = {"peer": [], "stemma": []}

    def fresh():
        torch.manual_seed(0)
        return family.build(arch, vocab_size=tok.get_vocab_size(), eos_token_id=eos_id(tok))

    # One short warm-up of each, unmeasured (allocator, thread pools).
    warm = TrainConfig(steps=3, batch_size=16, warmup=1)
    peer_loop(fresh(), tokens, warm, arch.context)
    stemma_loop(fresh(), tokens, warm, arch.context)
    for _ in range(rounds):
        results["peer"].append(peer_loop(fresh(), tokens, cfg, arch.context))
        results["stemma"].append(stemma_loop(fresh(), tokens, cfg, arch.context))
    peer = statistics.median(results["peer"])
    ours = statistics.median(results["stemma"])
    overhead = 1 - ours / peer
    print_table(
        f"pretrain throughput, {arch.arch} {arch.n_layer}x{arch.n_embd}, batch {cfg.batch_size}x{arch.context}, "
        f"{steps} steps x {rounds} rounds",
        [("tokens/s (median)", f"{peer:,.0f}", f"{ours:,.0f}", f"{ours / peer:.3f}"),
         ("runs", " ".join(f"{x:,.0f}" for x in results["peer"]), " ".join(f"{x:,.0f}" for x in results["stemma"]),
          "")],
    )
    print(f"peer: plain PyTorch loop; stemma overhead = 1 - stemma/peer = {overhead:+.1%} (target <= 10%)")
    write_json(args.json, {"family": arch.arch, "peer": "plain PyTorch loop", "peer_tokens_per_s": peer,
                           "stemma_tokens_per_s": ours, "overhead": overhead, "runs": results, "steps": steps,
                           "rounds": rounds})


if __name__ == "__main__":
    main()
