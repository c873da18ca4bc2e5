"""Serving throughput: stemma's batched multi-adapter server against PEFT `set_adapter` + `generate` per request.

The tree: a GPT-2 base and 8 LoRA children (r=8), built by stemma itself (cached under .stemma/, a second
run reuses it). `--base 2x256` (default): shaped like the demo's `en` (2 layers, 256 wide, vocab 4096, context
128); `--base 4x512`: 4 layers, 512 wide, vocab 8192, where the matrix multiplies weigh more than per-step
overhead on both sides.
The workload: 64 requests, prompts of 16-64 tokens cut from the shipped corpus, 64 new tokens each, greedy,
`ignore_eos` so every request generates exactly 64 tokens; request i goes to adapter i % 8.

- peer: Hugging Face PEFT with the 8 adapters loaded, `set_adapter` + `generate` per request, sequentially
  (a slice of the requests per round: it is the slow side);
- stemma, mixed: the 64 requests sent at once over HTTP to `stemma serve` running as its own process, request
  i to adapter i % 8, from an aiohttp client holding 64 keep-alive connections (as 64 users of a hosted model
  hold theirs); the client runs on the same cores, so its CPU time counts against stemma;
- stemma, base: the same requests, all to the base (no adapter rows: the LoRA path is skipped);
- stemma, penalised: the mixed requests, each also carrying `frequency_penalty` and `presence_penalty` (vLLM's
  semantics, applied per row inside the batched decode);
- resident memory (RSS) of a fresh process serving the 64 requests: 8 adapters vs base only;
- achieved FLOP/s of the mixed run (model FLOPs of prefill + decode, LoRA excluded) over a GEMM peak
  (1024x1024x1024 fp32: the faster of PyTorch's matmul and oneDNN's packed linear) measured in the same run.

Rounds interleave peer, stemma mixed, base and penalised, so load from other processes hits all alike (on the
GPT-2 base, stemma's three runs three times per round: each lasts under a second), stemma's three in a rotated order
each round; medians are reported. Peer
and stemma each run at 1 thread and at torch's default, each reported at its better one.

`--family llama`: a Llama-layout base of SmolLM2-135M's shape (30 layers, 576 wide, 9 heads sharing 3 KV heads,
SwiGLU MLP 1536, tied head; vocab 4096, context 128), pretrained 2 steps (the weights are near random: throughput
does not depend on them), and 8 LoRA children of rank 16 on all seven projections. Besides PEFT, a second peer:

- llama.cpp (llama-cpp-python) on the same model's GGUF, at f32 and at q8_0, set up as its users serve several
  adapters: llama.cpp batches no rows of different adapters, so each child is merged into its own GGUF (`stemma
  pull --format gguf`) and opened as its own `Llama` instance, all 8 resident; requests run one after another,
  each on its adapter's instance, greedy, exactly 64 new tokens (a slice of the requests per round, like PEFT).

`--replicas N`: instead of the above, the single-process `stemma serve` against `stemma serve --replicas N` (the
same API on Ray Serve, its own local Ray cluster) on the same machine and the same mixed requests: throughput and
per-request latency (p50, p99, from sending a request to reading its whole response). Each replica runs one thread
(Ray gives it one CPU); the one process runs at one thread and at every core, reported at its better one. The 8
adapters share one base, and Ray Serve routes by base (a replica holding it, loading it on another as requests
pile up), so how many responses each replica gave is reported. On one machine the replicas add no cores: the ratio
shows the Ray path's cost (proxy, router, replica, the response streamed back through them) against what one
process loses or gains on the same cores, not how replicas on several machines scale. The servers run one after
the other (Ray takes tens of seconds to start), each with a warm-up round first.

    python benchmarks/serve_bench.py [--quick] [--json out.json] [--base 2x256|4x512] [--family gpt2|llama]
                                     [--replicas N]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CORPUS, ROOT, parser, print_table, write_json  # noqa: E402

N_ADAPTERS, N_REQUESTS, NEW_TOKENS = 8, 64, 64
GGUF_KINDS = ("f32", "q8_0")
ADAPTERS = [f"a{i}" for i in range(N_ADAPTERS)]  # children of the master
PENALTY = {"frequency_penalty": 0.5, "presence_penalty": 0.5}
"""The penalised run: the mixed requests, each carrying vLLM's penalties (applied per row inside the batch)."""


SHAPES = {"2x256": dict(n_layer=2, n_embd=256, n_head=4, vocab_size=4096),
          "4x512": dict(n_layer=4, n_embd=512, n_head=8, vocab_size=8192)}
"""Bases: the demo's ``en`` student, and a wider, deeper one where the matrix multiplies, not per-step
overhead, dominate both sides (as in any production-sized model)."""

LLAMA_SHAPE = dict(arch="llama", n_layer=30, n_embd=576, n_head=9, n_kv_head=3, n_inner=1536, tie_embeddings=True,
                   vocab_size=4096)
"""SmolLM2-135M's shape with the bench tree's own (smaller) vocabulary."""


def build_tree(home: Path, shape: str = "2x256", family: str = "gpt2"):
    """The bench tree under ``home`` (reused when already built)."""
    os.environ["STEMMA_HOME"] = str(home)
    from stemma.build import build
    from stemma.spec import load_spec
    from stemma.workspace import Workspace

    d = home.parent
    d.mkdir(parents=True, exist_ok=True)
    corpus = d / "corpus.jsonl"
    with open(CORPUS / "en-manpages.jsonl") as f, open(corpus, "w") as out:
        for i, line in enumerate(f):
            if i >= 120:
                break
            doc = json.loads(line)
            doc["text"] = doc["text"][:4000]
            out.write(json.dumps(doc) + "\n")
    if family == "llama":
        # A 135M-shaped model trains at seconds per step on 2 cores: a couple of steps build the versions (the
        # weights do not change the throughput). The Llama family's LoRA targets are all seven projections.
        master = {**LLAMA_SHAPE, "context": 128, "steps": 2, "batch_size": 2, "warmup": 1}
        child = {"method": "lora", "dataset": "text", "config": {"steps": 1, "batch_size": 2, "warmup": 1, "r": 16}}
    else:
        master = {**SHAPES[shape], "context": 128, "steps": 30, "batch_size": 8, "warmup": 3}
        child = {"method": "lora", "dataset": "text", "config": {"steps": 4, "batch_size": 4, "warmup": 1, "r": 8}}
    spec = {"name": "serve-bench", "datasets": {"text": {"paths": ["corpus.jsonl"], "language": "en"}},
            "nodes": {"master": {"method": "pretrain", "dataset": "text", "config": master}}}
    for i, name in enumerate(ADAPTERS):
        spec["nodes"][name] = {**child, "config": {**child["config"], "seed": i + 1}}
    (d / "stemma.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    ws = Workspace.init(home)
    build(ws, load_spec(d / "stemma.yaml"))
    return ws


def make_requests(ws, n: int) -> list[list[int]]:
    """``n`` prompts of 16-64 tokens cut from the corpus (seeded)."""
    base = ws.resolve_version("master")
    tok = ws.tokenizer(base.row.tokenizer)
    texts = [json.loads(line)["text"] for line in open(CORPUS / "en-vim.jsonl")]
    rng = random.Random(0)
    out = []
    while len(out) < n:
        ids = tok.encode(rng.choice(texts)).ids
        k = rng.randint(16, 64)
        if len(ids) > k + 1:
            s = rng.randint(0, len(ids) - k - 1)
            out.append(ids[s : s + k])
    return out


def gemm_peak(n: int = 1024, reps: int = 5) -> float:
    """FLOP/s of an n x n x n fp32 GEMM: the faster of PyTorch's matmul (MKL) and the server's `Linear` (oneDNN's
    packed linear where PyTorch has it), so the fraction is against the best this machine does."""
    from stemma.serve.linear import Linear

    a, b = torch.randn(n, n), torch.randn(n, n)
    best = 0.0
    for kernel in (lambda: a @ b, lambda linear=Linear(b, None): linear(a)):
        kernel()
        t0 = time.perf_counter()
        for _ in range(reps):
            kernel()
        best = max(best, reps * 2 * n**3 / (time.perf_counter() - t0))
    return best


def load_peer(ws):
    """PEFT with every adapter loaded in one PeftModel (the usual way to serve several LoRA children)."""
    import tempfile

    from peft import PeftModel

    from stemma.models.io import materialise

    base = ws.load_model(ws.resolve_version("master").id)
    model = None
    with tempfile.TemporaryDirectory() as d:
        for i, name in enumerate(ADAPTERS):
            v = ws.resolve_version(name)
            files = {n: ws.store.verified_path(dg) for n, dg in v.manifest["files"].items()}
            path = materialise(files, Path(d) / f"a{i}")
            if model is None:
                model = PeftModel.from_pretrained(base, str(path), adapter_name=f"a{i}")
            else:
                model.load_adapter(str(path), adapter_name=f"a{i}")
    model.eval()
    return model


def peer_run(model, prompts: list[list[int]], offset: int = 0) -> float:
    """Per request: set_adapter + greedy generate of NEW_TOKENS tokens, sequentially. Returns tokens/s."""
    eos = model.config.eos_token_id
    with torch.inference_mode():
        t0 = time.perf_counter()
        tokens = 0
        for i, p in enumerate(prompts):
            model.set_adapter(f"a{(i + offset) % N_ADAPTERS}")
            out = model.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                 do_sample=False, pad_token_id=eos)
            tokens += out.shape[1] - len(p)
    return tokens / (time.perf_counter() - t0)


def build_ggufs(ws, home: Path) -> dict[str, dict[str, Path]]:
    """Per adapter, its child merged into the base as GGUF at f32 and q8_0 (cached beside the tree, by version)."""
    from stemma.pull import pull, quantize_gguf

    out: dict[str, dict[str, Path]] = {}
    for name in ADAPTERS:
        v = ws.resolve_version(name)
        d = home.parent / "gguf" / f"{name}-{v.id[:12]}"
        if not (d / "model.gguf").exists():
            pull(ws, v, d, "gguf", gguf_type="f32", force=True)
        if not (d / "model-q8_0.gguf").exists():
            quantize_gguf(d / "model.gguf", d / "model-q8_0.gguf", "q8_0")
        out[name] = {"f32": d / "model.gguf", "q8_0": d / "model-q8_0.gguf"}
    return out


def open_llama(path: Path, threads: int):
    """A llama.cpp instance on ``path``, opened as stemma opens every GGUF (`stemma.footprint.open_gguf`: the CPU
    backend's extra weight buffers off)."""
    from stemma.footprint import open_gguf

    # n_ctx: the model's context, which holds the longest prompt (64) and the tokens evaluated after it (63).
    return open_gguf(path, n_ctx=128, n_threads=threads, n_threads_batch=threads)


def llamacpp_run(instances: dict, prompts: list[list[int]], offset: int = 0) -> float:
    """Per request, on its adapter's instance: greedy, exactly NEW_TOKENS tokens (EOS not honoured, like
    ``ignore_eos``), sequentially. Returns tokens/s."""
    t0 = time.perf_counter()
    tokens = 0
    for i, p in enumerate(prompts):
        llm = instances[ADAPTERS[(i + offset) % N_ADAPTERS]]
        llm.reset()
        for n, _ in enumerate(llm.generate(p, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0), 1):
            if n == NEW_TOKENS:
                break
        tokens += n
    return tokens / (time.perf_counter() - t0)


async def _fire(session, prompts: list[list[int]], models: list[str], **sampling) -> tuple[int, float]:
    """Send every request at once (each with ``sampling`` besides greedy decoding of NEW_TOKENS); returns
    (completion tokens, seconds until the last response)."""

    async def one(p, m):
        async with session.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": NEW_TOKENS,
                                                         "temperature": 0, "ignore_eos": True, **sampling}) as r:
            if r.status != 200:
                raise RuntimeError(f"{m}: HTTP {r.status}: {await r.text()}")
            return (await r.json())["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    counts = await asyncio.gather(*(one(p, m) for p, m in zip(prompts, models)))
    return sum(counts), time.perf_counter() - t0


class ServerProcess:
    """`stemma serve` as its own process on loopback (how users run it), ``threads`` intra-op threads."""

    def __init__(self, home: Path, threads: int):
        from stemma.serve.server import free_port

        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "STEMMA_HOME": str(home), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads)}
        self.log = open(home.parent / "server.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "stemma.cli", "serve", "--port", str(self.port),
                                      "--max-batch", "64"], env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def __enter__(self) -> str:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError(f"stemma serve did not start; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# ---------------------------------------------------------------------- one process vs Ray Serve replicas
REPLICA_HEADER = "x-stemma-replica"
"""The header naming the replica that answered (`stemma.serve.replicas`)."""


async def _fire_timed(session, prompts: list[list[int]], models: list[str]) -> dict:
    """Send every request at once, as `_fire` does; returns completion tokens, seconds until the last response,
    each request's latency (sent to whole response read) and how many responses each replica gave."""

    async def one(p, m):
        t0 = time.perf_counter()
        async with session.post("/v1/completions", json={"model": m, "prompt": p, "max_tokens": NEW_TOKENS,
                                                         "temperature": 0, "ignore_eos": True}) as r:
            if r.status != 200:
                raise RuntimeError(f"{m}: HTTP {r.status}: {await r.text()}")
            tokens = (await r.json())["usage"]["completion_tokens"]
            return tokens, time.perf_counter() - t0, r.headers.get(REPLICA_HEADER, "one process")

    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(p, m) for p, m in zip(prompts, models)))
    seconds = time.perf_counter() - t0
    by_replica: dict[str, int] = {}
    for _, _, replica in results:
        by_replica[replica] = by_replica.get(replica, 0) + 1
    return {"tokens": sum(n for n, _, _ in results), "seconds": seconds,
            "latencies": [lat for _, lat, _ in results], "by_replica": by_replica}


class RayServeProcess:
    """`stemma serve --replicas N` as its own process and session (it starts a local Ray cluster), on loopback.

    Stopped as its test stops it, also on failure: SIGTERM (the server deletes the application and stops Ray), then
    SIGKILL to whatever of its session is left (Ray's own processes)."""

    def __init__(self, home: Path, replicas: int, threads: int):
        from stemma.serve.server import free_port

        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.ray_tmp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths stay under 108 bytes
        env = {**os.environ, "STEMMA_HOME": str(home), "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": self.ray_tmp}
        self.log = open(home.parent / "ray-serve.log", "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "stemma.cli", "serve", "--replicas", str(replicas),
                                      "--port", str(self.port), "--max-batch", "64"], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def __enter__(self) -> str:
        import httpx

        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"stemma serve --replicas did not start; see {self.log.name}")

    def __exit__(self, *exc) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.log.close()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)


def measure_replicas(home: Path, prompts, replicas: int, rounds: int) -> dict:
    """``rounds`` rounds of the mixed requests against one `stemma serve` process at one thread and at every core,
    then against ``replicas`` Ray Serve replicas of one thread each; each server gets one unmeasured round first
    (engine, adapters, connections)."""
    models = [ADAPTERS[i % N_ADAPTERS] for i in range(len(prompts))]
    res = {}

    async def run(url: str) -> list[dict]:
        import aiohttp

        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=N_REQUESTS),
                                         timeout=aiohttp.ClientTimeout(total=600)) as session:
            await _fire_timed(session, prompts, models)
            return [await _fire_timed(session, prompts, models) for _ in range(rounds)]

    cores = len(os.sched_getaffinity(0))
    servers = [(f"single {t}", lambda t=t: ServerProcess(home, t)) for t in sorted({1, cores})]
    for kind, server in (*servers, ("replicas", lambda: RayServeProcess(home, replicas, 1))):
        with server() as url:
            runs = asyncio.run(run(url))
        latencies = sorted(lat for r in runs for lat in r["latencies"])
        by_replica: dict[str, int] = {}
        for r in runs:
            for name, n in r["by_replica"].items():
                by_replica[name] = by_replica.get(name, 0) + n
        res[kind] = {"tokens_per_s": statistics.median(r["tokens"] / r["seconds"] for r in runs),
                     "runs": [r["tokens"] / r["seconds"] for r in runs],
                     "p50_s": percentile(latencies, 50), "p99_s": percentile(latencies, 99),
                     "by_replica": by_replica, "threads": int(kind.split()[1]) if kind != "replicas" else 1}
    return res


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of sorted values."""
    import math

    return sorted_values[max(0, math.ceil(len(sorted_values) * q / 100) - 1)]


def replicas_main(args, ws, home: Path, prompts) -> None:
    rounds = 2 if args.quick else 4
    res = measure_replicas(home, prompts, args.replicas, rounds)
    single = max((v for k, v in res.items() if k != "replicas"), key=lambda v: v["tokens_per_s"])
    many = res["replicas"]
    what = ("Llama 30x576 (SmolLM2-135M shape)" if args.family == "llama"
            else f"GPT-2 {args.base}") + f" + {N_ADAPTERS} LoRA children"
    print_table(
        f"serving, one process vs Ray Serve with {args.replicas} replicas, {what}, {N_REQUESTS} mixed requests x "
        f"{NEW_TOKENS} new tokens, greedy, {rounds} round(s); threads: one process {single['threads']}, each "
        f"replica 1; {os.cpu_count()} cores",
        [("tokens/s: one process vs replicas", f"{single['tokens_per_s']:,.0f}", f"{many['tokens_per_s']:,.0f}",
          f"{many['tokens_per_s'] / single['tokens_per_s']:.2f}"),
         *[(f"latency {q} (s): one process vs replicas", f"{single[q + '_s']:.2f}", f"{many[q + '_s']:.2f}",
            f"{many[q + '_s'] / single[q + '_s']:.2f}") for q in ("p50", "p99")]],
        columns=("one process", f"{args.replicas} replicas"),
    )
    print("one process: " + ", ".join(f"{v['threads']} thread(s) {v['tokens_per_s']:,.0f} tokens/s, p99 "
                                      f"{v['p99_s']:.2f} s" for k, v in res.items() if k != "replicas")
          + "; responses per replica: " + ", ".join(f"{k} {n}" for k, n in sorted(many["by_replica"].items())))
    print(f"{args.replicas} replicas on the {os.cpu_count()} cores of one machine add no cores: the ratio is the Ray "
          "path's cost against how well one process uses the same cores, not how replicas on several machines scale")
    write_json(args.json, {
        "replicas": args.replicas, "family": args.family,
        "base_shape": "smollm2-135m" if args.family == "llama" else args.base,
        "single_tokens_per_s": single["tokens_per_s"], "replicas_tokens_per_s": many["tokens_per_s"],
        "replicas_vs_single": many["tokens_per_s"] / single["tokens_per_s"],
        "single_p50_s": single["p50_s"], "replicas_p50_s": many["p50_s"],
        "single_p99_s": single["p99_s"], "replicas_p99_s": many["p99_s"],
        "single_threads": single["threads"], "responses_by_replica": many["by_replica"],
        "by_server": {k: {x: v[x] for x in ("tokens_per_s", "p50_s", "p99_s", "threads", "runs")}
                      for k, v in res.items()},
        "requests": N_REQUESTS, "new_tokens": NEW_TOKENS, "adapters": N_ADAPTERS, "rounds": rounds,
        "threads_per_replica": 1,
    })


def measure(ws, home: Path, prompts, rounds: int, peer_per_round: int, threads: int, ggufs=None,
            repeats: int = 1) -> dict:
    """Rounds of (peer, [llama.cpp f32, q8_0,] stemma mixed, base and penalised), interleaved so drifts in machine
    load hit all alike; stemma's three runs ``repeats`` times per round (a GPT-2 run lasts under a second, where a
    passing hiccup of the machine would otherwise decide a ratio).

    The peers run in this process at ``threads``; stemma is a `stemma serve` process at the same count, and the
    client that sends its requests runs here (its CPU time counts against stemma)."""
    torch.set_num_threads(threads)
    peer = load_peer(ws)
    peer_run(peer, prompts[:2])  # warm-up
    cpp = {kind: {name: open_llama(files[kind], threads) for name, files in ggufs.items()}
           for kind in GGUF_KINDS} if ggufs else {}
    for instances in cpp.values():
        llamacpp_run(instances, prompts[:N_ADAPTERS])  # warm-up: the first decode of each instance
    mixed_models = [ADAPTERS[i % N_ADAPTERS] for i in range(len(prompts))]
    base_models = ["master"] * len(prompts)
    res = {"peer": [], "mixed": [], "base": [], "penalised": [], "mixed_seconds": [],
           **{f"llama.cpp {k}": [] for k in cpp}}

    async def interleaved(url: str) -> None:
        import aiohttp

        # aiohttp, not httpx: with 64 requests at once, httpx's first request reached the server ~45 ms after
        # the round began (aiohttp: ~10 ms) and its last response was read ~25 ms after the server sent it
        # (aiohttp: ~3 ms); that client time would be charged to the server.
        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=N_REQUESTS),
                                         timeout=aiohttp.ClientTimeout(total=600)) as session:
            await _fire(session, prompts, mixed_models)  # warm-up: engine, adapters and the 64 connections
            for r in range(rounds):
                start = (r * peer_per_round) % len(prompts)
                res["peer"].append(peer_run(peer, prompts[start : start + peer_per_round], offset=start))
                for kind, instances in cpp.items():
                    res[f"llama.cpp {kind}"].append(
                        llamacpp_run(instances, prompts[start : start + peer_per_round], offset=start))
                # stemma's three runs take turns at going first: the first run after the peers ran slower than
                # the same run later in the round (by ~10% on the Llama tree).
                kinds = [("mixed", mixed_models, {}), ("base", base_models, {}), ("penalised", mixed_models, PENALTY)]
                kinds = kinds[r % 3 :] + kinds[: r % 3]
                for _ in range(repeats):
                    for kind, models, sampling in kinds:
                        n, secs = await _fire(session, prompts, models, **sampling)
                        res[kind].append(n / secs)
                        if kind == "mixed":
                            res["mixed_seconds"].append(secs)

    with ServerProcess(home, threads) as url:
        asyncio.run(interleaved(url))
    for instances in cpp.values():
        for llm in instances.values():
            llm.close()
    return res


def decoder_shape(ws):
    """The served base's shape (for its FLOPs per token)."""
    from stemma.models import families

    config = ws.load_model(ws.resolve_version("master").id).config
    return families.checked(config).decoder_shape(config)


def rss_probe(kind: str) -> None:
    """Child process: serve the 64 requests (engine only, no HTTP) and print the resident set size."""
    import psutil

    from stemma.serve.config import ServeConfig
    from stemma.serve.engine import SamplingParams, Sequence
    from stemma.serve.pool import ModelPool
    from stemma.workspace import Workspace

    ws = Workspace.open()
    prompts = make_requests(ws, N_REQUESTS)
    pool = ModelPool(ws, ServeConfig(max_batch=64))
    done = []
    seqs = []
    for i, p in enumerate(prompts):
        t = pool.resolve(ADAPTERS[i % N_ADAPTERS] if kind == "mixed" else "master")
        s = Sequence(prompt=p, params=SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True),
                     adapter=t.adapters, sink=lambda ev: done.append(1) if ev.done else None)
        seqs.append((t, s))
    for t, s in seqs:
        pool.submit(t, [s])
    while len(done) < len(seqs):
        time.sleep(0.01)
    pool.close()
    engine = next(iter(pool.engines.values()))
    # The peak from VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a child started by
    # a large benchmark process would report its parent's peak.
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"rss": psutil.Process().memory_info().rss, "engine_bytes": engine.decoder.nbytes,
                      "peak_rss": int(hwm.split()[1]) * 1024,
                      "adapters": len(engine.adapters)}))


def probe(home: Path, kind: str) -> dict:
    env = {**os.environ, "STEMMA_HOME": str(home)}
    out = subprocess.run([sys.executable, __file__, "--rss-probe", kind], env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--rss-probe", choices=["base", "mixed"], help=argparse_hidden())
    p.add_argument("--base", choices=sorted(SHAPES), default="2x256", help="shape of the served GPT-2 base")
    p.add_argument("--family", choices=["gpt2", "llama"], default="gpt2",
                   help="gpt2: the --base shape; llama: SmolLM2-135M's shape, also against llama.cpp")
    p.add_argument("--replicas", type=int,
                   help="measure one stemma serve process against Ray Serve with this many replicas instead")
    args = p.parse_args()
    if args.rss_probe:
        rss_probe(args.rss_probe)
        return
    llama = args.family == "llama"
    if llama:
        name = "serve-bench-llama"
    else:
        name = "serve-bench" if args.base == "2x256" else f"serve-bench-{args.base}"
    home = ROOT / ".stemma" / name / "home"
    t0 = time.perf_counter()
    ws = build_tree(home, args.base, args.family)
    if args.replicas is not None:
        if args.replicas < 1:
            raise SystemExit("--replicas: at least 1")
        print(f"bench tree ready in {time.perf_counter() - t0:.1f}s ({home})")
        replicas_main(args, ws, home, make_requests(ws, N_REQUESTS))
        return
    ggufs = build_ggufs(ws, home) if llama else None
    print(f"bench tree ready in {time.perf_counter() - t0:.1f}s ({home})")
    prompts = make_requests(ws, N_REQUESTS)
    if llama:
        # The sequential peers decode a 135M model at tens of tokens/s: fewer of their requests per round.
        rounds, peer_per_round = (2, 4) if args.quick else (3, 8)
    else:
        rounds, peer_per_round = (2, 8) if args.quick else (4, 16)
    repeats = 1 if llama else 3
    cpp_keys = [f"llama.cpp {k}" for k in GGUF_KINDS] if llama else []
    # Each side at its best thread count: on a shared 2-core machine two OpenMP threads can lose more to
    # waiting for each other than they gain (small sequential ops suffer most, i.e. the peer).
    by_threads = {}
    for nt in sorted({1, torch.get_num_threads()}):
        runs = measure(ws, home, prompts, rounds, peer_per_round, nt, ggufs, repeats)
        kinds = ("peer", "mixed", "base", "penalised", *cpp_keys)
        by_threads[nt] = {"peak": gemm_peak(), "runs": {k: runs[k] for k in kinds},
                          "mixed_seconds": statistics.median(runs["mixed_seconds"]),
                          **{k: statistics.median(runs[k]) for k in kinds}}
        print(f"threads {nt}: PEFT {by_threads[nt]['peer']:,.0f} tokens/s, "
              + "".join(f"{k} {by_threads[nt][k]:,.0f}, " for k in cpp_keys)
              + f"stemma mixed {by_threads[nt]['mixed']:,.0f}, base {by_threads[nt]['base']:,.0f}")
    peer_nt = max(by_threads, key=lambda k: by_threads[k]["peer"])
    cpp = {k: max(by_threads[nt][k] for nt in by_threads) for k in cpp_keys}
    cpp_nt = {k: max(by_threads, key=lambda nt, k=k: by_threads[nt][k]) for k in cpp_keys}
    nt = max(by_threads, key=lambda k: by_threads[k]["mixed"])
    best = by_threads[nt]
    peer, mixed, base = by_threads[peer_nt]["peer"], best["mixed"], best["base"]
    peak = max(b["peak"] for b in by_threads.values())
    dec = decoder_shape(ws)
    # Model FLOPs of the mixed run: each prompt prefilled, then NEW_TOKENS - 1 decode steps at growing context.
    flops = 0.0
    for p in prompts:
        flops += sum(dec.flops_per_token(t + 1) for t in range(len(p)))
        flops += sum(dec.flops_per_token(len(p) + t + 1) for t in range(NEW_TOKENS - 1))
    achieved = flops / best["mixed_seconds"]
    rss_base, rss_mixed = probe(home, "base"), probe(home, "mixed")
    figures = {
        "speedup_vs_peft": mixed / peer, "mixed_vs_base": mixed / base,
        "penalised_vs_mixed": best["penalised"] / mixed, "penalty": PENALTY,
        "rss_ratio": rss_mixed["rss"] / rss_base["rss"], "gemm_fraction": achieved / peak,
        "peer": "PEFT set_adapter + generate per request, sequential",
        "peer_tokens_per_s": peer, "mixed_tokens_per_s": mixed, "base_tokens_per_s": base,
        "threads": {"peer": peer_nt, "stemma": nt, **cpp_nt}, "rss_base": rss_base, "rss_mixed": rss_mixed,
        "by_threads": {k: {x: v[x] for x in ("peak", "peer", "mixed", "base", "penalised", "runs", *cpp_keys)}
                       for k, v in by_threads.items()},
        "gemm_peak_flops": peak, "achieved_flops": achieved, "requests": N_REQUESTS, "new_tokens": NEW_TOKENS,
        "adapters": N_ADAPTERS, "family": args.family, "base_shape": "smollm2-135m" if llama else args.base,
        "peer_requests_per_round": peer_per_round, "rounds": rounds, "stemma_runs_per_round": repeats,
    }
    if llama:
        figures.update({
            "speedup_vs_llamacpp": mixed / cpp["llama.cpp f32"],
            "speedup_vs_llamacpp_q8_0": mixed / cpp["llama.cpp q8_0"],
            "llamacpp_tokens_per_s": cpp["llama.cpp f32"], "llamacpp_q8_0_tokens_per_s": cpp["llama.cpp q8_0"],
            "llamacpp": "llama.cpp, one merged GGUF and one Llama instance per adapter, requests sequential",
            "lora": {"r": 16, "targets": "q,k,v,o,gate,up,down"},
        })
        title = (f"serving, Llama 30x576 (SmolLM2-135M shape) vocab {LLAMA_SHAPE['vocab_size']} + {N_ADAPTERS} "
                 f"LoRA children r16")
        cpp_rows = [(f"tokens/s: llama.cpp {k[10:]} per adapter vs stemma mixed", f"{cpp[k]:,.0f}", f"{mixed:,.0f}",
                     f"{mixed / cpp[k]:.1f}x") for k in cpp_keys]
    else:
        title = f"serving, GPT-2 {args.base} vocab {SHAPES[args.base]['vocab_size']} + {N_ADAPTERS} LoRA children"
        cpp_rows = []
    mb = 1 << 20
    print_table(
        f"{title}, {N_REQUESTS} requests x {NEW_TOKENS} new tokens, greedy, {rounds} round(s); threads: PEFT "
        f"{peer_nt}, " + "".join(f"{k} {cpp_nt[k]}, " for k in cpp_keys) + f"stemma {nt}",
        [("tokens/s: PEFT per request vs stemma mixed", f"{peer:,.0f}", f"{mixed:,.0f}", f"{mixed / peer:.1f}x"),
         *cpp_rows,
         ("tokens/s: stemma base only vs mixed", f"{base:,.0f}", f"{mixed:,.0f}", f"{mixed / base:.2f}"),
         ("tokens/s: stemma mixed vs mixed with penalties", f"{mixed:,.0f}", f"{best['penalised']:,.0f}",
          f"{best['penalised'] / mixed:.2f}"),
         ("RSS: base only vs 8 adapters (MB)", f"{rss_base['rss'] / mb:.0f}", f"{rss_mixed['rss'] / mb:.0f}",
          f"{rss_mixed['rss'] / rss_base['rss']:.3f}"),
         ("peak RSS: base only vs 8 adapters (MB)", f"{rss_base['peak_rss'] / mb:.0f}",
          f"{rss_mixed['peak_rss'] / mb:.0f}", f"{rss_mixed['peak_rss'] / rss_base['peak_rss']:.3f}"),
         ("engine bytes: base only vs 8 adapters (MB)", f"{rss_base['engine_bytes'] / mb:.1f}",
          f"{rss_mixed['engine_bytes'] / mb:.1f}", f"{rss_mixed['engine_bytes'] / rss_base['engine_bytes']:.3f}"),
         ("FLOP/s: GEMM peak vs achieved (mixed)", f"{peak / 1e9:.1f} G", f"{achieved / 1e9:.1f} G",
          f"{achieved / peak:.3f}")],
    )
    print(f"targets: speedup_vs_peft >= 10 ({figures['speedup_vs_peft']:.1f}), mixed_vs_base >= 0.8 "
          f"({figures['mixed_vs_base']:.2f}), penalised_vs_mixed >= 0.9 ({figures['penalised_vs_mixed']:.2f}), "
          f"rss_ratio <= 1.15 ({figures['rss_ratio']:.3f}); "
          f"gemm_fraction {figures['gemm_fraction']:.3f}"
          + "".join(f"; speedup_vs_llamacpp{s} {figures['speedup_vs_llamacpp' + s]:.1f}" for s in ("", "_q8_0")
                    if llama))
    write_json(args.json, figures)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
