"""Pretraining throughput: stemma's training loop against a plain PyTorch loop, same model, batch and data.

The peer is the loop anyone would write: sample windows, forward, cross-entropy, backward, clip, AdamW step,
with the same cosine schedule. stemma's `Trainer` adds deterministic per-step batch sampling, loss
tracking, a live progress bar and resumable checkpoints; the overhead of all that is what this measures.
Runs alternate (peer, stemma, peer, stemma, ...) so drift in machine speed hits both; medians are reported.

`--nproc N`: data-parallel training instead. One small pretrain node (the same model and global batch) is built
through the real CLI, each time in a fresh home: `stemma build` in one process (at one thread and at every core,
reported at its better one) and `stemma build --nproc N`; tokens/s is each manifest's ``train`` tokens over
seconds, and `loss_parity` the largest relative gap between the N-process loss curve and a one-process one (the
same batches and mean gradient: only the order of float additions differs). N processes of one machine share its
cores and add no compute: their ratio to one process shows how well one process uses the cores, not scaling. What
N machines would gain depends on the all-reduce of the trained parameters' gradients every step, which is measured
here (N gloo processes on loopback, the model's parameter count in float32) and set against the one-process step
time, also as a ring all-reduce over 10 Gbit/s.

    python benchmarks/train_throughput.py [--family gpt2|llama] [--quick] [--json out.json] [--nproc N]
"""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CORPUS, parser, print_table, sample_texts, write_json  # noqa: E402

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


# ---------------------------------------------------------------------- data-parallel: 1 process vs --nproc N
NETWORK_BYTES_PER_S = 1.25e9
"""10 Gbit/s: the link assumed for the all-reduce between machines in the projection (ring all-reduce)."""


def parallel_spec(d: Path, arch: ArchConfig, steps: int, batch_size: int) -> Path:
    """A tree of one pretrain node of ``arch``'s shape on a slice of the shipped corpus (about 400 kB)."""
    import yaml

    corpus, total = d / "corpus.jsonl", 0
    with open(CORPUS / "en-manpages.jsonl") as f, open(corpus, "w") as out:
        for line in f:
            out.write(line)
            total += len(json.loads(line)["text"])
            if total > 400_000:
                break
    shape = {k: getattr(arch, k) for k in ("arch", "n_layer", "n_embd", "n_head", "n_kv_head", "context")
             if getattr(arch, k) is not None}
    config = {**shape, "vocab_size": 4096, "steps": steps, "batch_size": batch_size, "lr": 1e-3, "warmup": 5}
    spec = {"name": "train-bench", "datasets": {"text": {"paths": ["corpus.jsonl"], "language": "en"}},
            "nodes": {"master": {"method": "pretrain", "dataset": "text", "config": config}}}
    path = d / "stemma.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def cli_build(spec: Path, home: Path, nproc: int, threads: int | None = None) -> dict:
    """`stemma build` of ``spec`` in a fresh ``home`` in ``nproc`` processes, each with ``threads`` compute threads
    (default: its share of the cores, as the launcher sets them); returns the master's manifest ``train`` section,
    its recipe key and its parameter count."""
    from stemma.workspace import Workspace

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(STEMMA_HOME=str(home), COLUMNS="200", **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    cmd = [sys.executable, "-m", "stemma.cli", "build", str(spec), "--no-footprint",
           *(["--nproc", str(nproc)] if nproc > 1 else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{done.stderr[-3000:]}")
    ws = Workspace.open(home)
    version = ws.resolve_version("master")
    # The registry's count (distinct parameters, a tied embedding once): what DDP all-reduces for a full pretrain.
    return {**version.manifest["train"], "params": version.row.params, "recipe_key": version.manifest["recipe_key"],
            "threads": threads or max(1, len(os.sched_getaffinity(0)) // nproc)}


def _all_reduce_rank(rank: int, size: int, port: int, numel: int, reps: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    t = torch.ones(numel)
    times = []
    for i in range(reps + 2):  # two unmeasured (connections, buffers)
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def all_reduce_seconds(numel: int, size: int, reps: int = 5) -> float:
    """Median seconds of one gloo all-reduce of ``numel`` float32 values among ``size`` processes on loopback (the
    gradient exchange DDP does every step, here without the backward it overlaps with)."""
    import torch.multiprocessing as mp

    from stemma.serve.server import free_port

    with tempfile.TemporaryDirectory() as d:
        out = str(Path(d) / "times.json")
        mp.spawn(_all_reduce_rank, args=(size, free_port("127.0.0.1"), numel, reps, out), nprocs=size)
        return statistics.median(json.loads(Path(out).read_text()))


def largest_gap(a: list[float], b: list[float]) -> float:
    """The largest relative difference of two loss curves at any point."""
    if len(a) != len(b):
        raise RuntimeError(f"loss curves of different lengths: {len(a)} and {len(b)}")
    return max(abs(x - y) / abs(x) for x, y in zip(a, b))


def data_parallel(arch: ArchConfig, nproc: int, quick: bool, json_path: Path | None) -> None:
    """One process against ``nproc`` on the same recipe: tokens/s, loss parity, and the projection to machines."""
    steps, batch_size = (25, 16) if quick else (80, 16)
    if batch_size % nproc:
        raise SystemExit(f"--nproc {nproc} must divide the batch of {batch_size} rows")
    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="train-bench-") as d:
        spec = parallel_spec(Path(d), arch, steps, batch_size)
        # One process at one thread and at every core, reported at its better one: on a shared machine, threads of
        # one process can lose more to waiting for each other than they gain.
        singles = [cli_build(spec, Path(d) / f"one-{t}", 1, threads=t) for t in sorted({1, cores})]
        many = cli_build(spec, Path(d) / f"n{nproc}", nproc)
    one = max(singles, key=lambda r: r["tokens"] / r["seconds"])
    same_recipe = all(r["recipe_key"] == many["recipe_key"] for r in singles)
    tps_one, tps_many = one["tokens"] / one["seconds"], many["tokens"] / many["seconds"]
    # Against each one-process curve (their thread counts change float addition order too): the largest gap.
    parity = max(largest_gap(r["loss_curve"]["loss"], many["loss_curve"]["loss"]) for r in singles)
    step_one = one["seconds"] / steps
    grad_bytes = 4 * one["params"]
    reduce_s = all_reduce_seconds(one["params"], nproc)
    print_table(
        f"data-parallel pretrain, {arch.arch} {arch.n_layer}x{arch.n_embd}, global batch {batch_size}x{arch.context}, "
        f"{steps} steps, {cores} cores",
        [("tokens/s", f"{tps_one:,.0f}", f"{tps_many:,.0f}", f"{tps_many / tps_one:.3f}"),
         ("threads per process", str(one["threads"]), str(many["threads"]), ""),
         ("seconds training", f"{one['seconds']:.1f}", f"{many['seconds']:.1f}", ""),
         ("final loss", f"{one['final_loss']:.4f}", f"{many['final_loss']:.4f}", ""),
         ("loss parity (largest relative gap)", "", "", f"{parity:.1e}")],
        columns=("1 process", f"{nproc} processes"),
    )
    print("1 process: " + ", ".join(f"{r['threads']} thread(s) {r['tokens'] / r['seconds']:,.0f} tokens/s"
                                    for r in singles)
          + f"; the same recipe key: {same_recipe}")
    print(f"{nproc} processes share this machine's {cores} cores (and any other work on them): they add no compute, "
          "so their ratio to one process says how well one process uses these cores, not how data-parallel "
          "training scales; that depends on the all-reduce below")
    # N machines: each computes 1/N of the global batch, then all-reduces the gradients (4 bytes per parameter).
    # Two bounds on that exchange: the loopback all-reduce measured here, and a ring over a 10 Gbit/s link, which
    # moves 2 (N-1)/N of the gradient bytes in and out of each machine. DDP overlaps part of it with the backward.
    print(f"all-reduce of {one['params'] / 1e6:.2f}M parameters ({grad_bytes / 2**20:.1f} MiB of gradients): "
          f"{reduce_s * 1e3:.1f} ms measured ({nproc} gloo processes, loopback) against {step_one * 1e3:.0f} ms per "
          f"step in one process ({reduce_s / step_one:.1%} of a step)")
    scaling = {}
    for machines in (2, 4, 8):
        net_s = 2 * (machines - 1) / machines * grad_bytes / NETWORK_BYTES_PER_S
        scaling[machines] = {
            "speedup_loopback_all_reduce": step_one / (step_one / machines + reduce_s),
            "speedup_10gbit_all_reduce": step_one / (step_one / machines + net_s),
            "all_reduce_10gbit_s": net_s,
        }
        print(f"expected on {machines} machines (one process each, this machine's speed): tokens/s x "
              f"{scaling[machines]['speedup_loopback_all_reduce']:.2f} with the measured all-reduce, x "
              f"{scaling[machines]['speedup_10gbit_all_reduce']:.2f} over 10 Gbit/s "
              f"({net_s * 1e3:.1f} ms per step) - at most x{machines}")
    write_json(json_path, {
        "family": arch.arch, "nproc": nproc, "steps": steps, "global_batch": batch_size, "context": arch.context,
        "single_tokens_per_s": tps_one, "parallel_tokens_per_s": tps_many, "parallel_vs_single": tps_many / tps_one,
        "loss_parity": parity, "same_recipe": same_recipe, "params": one["params"],
        "all_reduce_s": reduce_s, "step_s_single": step_one, "all_reduce_share_of_step": reduce_s / step_one,
        "scaling_by_machines": scaling, "single": one, "single_runs": singles, "parallel": many,
    })


def main() -> None:
    ap = parser(__doc__.splitlines()[0])
    ap.add_argument("--family", choices=families.names(), default="gpt2",
                    help="model family of the trained decoder (llama: the demo master's shape, 4 KV heads of 8)")
    ap.add_argument("--nproc", type=int, help="compare 1 process with this many, data-parallel (stemma build --nproc)")
    args = ap.parse_args()
    if args.family == "llama":
        arch = ArchConfig(arch="llama", n_layer=6, n_embd=256, n_head=8, n_kv_head=4, context=128)
    else:
        arch = ArchConfig(arch="gpt2", n_layer=6, n_embd=256, n_head=4, context=128)
    if args.nproc is not None:
        if args.nproc < 2:
            raise SystemExit("--nproc: at least 2 processes to compare with one")
        data_parallel(arch, args.nproc, args.quick, args.json)
        return
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
