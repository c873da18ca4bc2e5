"""Footprints: what a version costs on a machine, measured, never estimated.

For each version: bytes on disk (everything loading it reads: for an adapter, its chain down from the nearest
full model), peak resident memory to load it and to generate at its full context length, and decode
tokens/s, single-stream and batched. Each measurement runs in a fresh child process, so the resident memory
is that of a real process that imported the runtime and loaded only this model (Python + torch included: that
is what a device must hold). The numbers are stored as metrics of the version (``footprint.*``) together with a
description of the machine, whose GEMM speed lets the selector scale tokens/s to another machine.

    python -m stemma.footprint VERSION_ID [--context N] [--new-tokens N] [--batch N]   (the child; prints JSON)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from .errors import StemmaError

METRICS = ("disk_bytes", "rss_load_bytes", "rss_generate_bytes", "tokens_per_s", "tokens_per_s_batched")
PREFIX = "footprint."


@dataclass(frozen=True)
class Footprint:
    """One version's measured cost on one machine."""

    disk_bytes: int
    """Bytes read to load the version (adapter chains include their base)."""
    rss_load_bytes: int
    """Peak resident memory of a process that imported the runtime and loaded the model."""
    rss_generate_bytes: int
    """Peak resident memory after also generating at ``context`` tokens (single stream, then batched)."""
    tokens_per_s: float
    """Greedy decode speed, one stream, with a KV cache."""
    tokens_per_s_batched: float
    """Greedy decode speed summed over ``batch`` streams."""
    context: int
    """Tokens in the sequence at the end of generation (prompt + new tokens)."""
    new_tokens: int
    """Tokens generated per stream."""
    batch: int
    """Streams in the batched measurement."""
    machine: dict[str, Any]
    """The machine measured on (`machine_profile`)."""

    @property
    def ms_per_token(self) -> float:
        return 1000.0 / self.tokens_per_s if self.tokens_per_s > 0 else float("inf")


def _proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (VmRSS now, VmHWM the peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@functools.lru_cache(maxsize=1)
def machine_profile(gemm_n: int = 512, seconds: float = 0.5) -> dict[str, Any]:
    """This machine: CPU, cores, memory, and measured fp32 GEMM throughput (GFLOP/s) with torch's threads."""
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    a, b = torch.randn(gemm_n, gemm_n), torch.randn(gemm_n, gemm_n)
    a @ b  # warm the thread pool
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        n += 1
    gflops = 2 * gemm_n**3 * n / (time.perf_counter() - t0) / 1e9
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "memory_bytes": psutil.virtual_memory().total, "gemm_gflops": round(gflops, 1),
            "system": f"{platform.system()} {platform.machine()}", "torch": torch.__version__}


def disk_bytes(ws, version_id: str) -> int:
    """Bytes of every file loading the version reads (its load plan: the base's files and each adapter's)."""
    return sum(ws.store.size(d) for d in ws.plan(version_id).digests())


def measure(ws, version_id: str, new_tokens: int = 32, batch: int = 8, timeout: float = 600) -> Footprint:
    """Measure a version in a fresh child process and return its footprint (not stored; see `record`)."""
    v = ws.version(version_id)
    arch = v.manifest.get("architecture") or {}
    context = int(arch.get("context") or 0)
    env = {**os.environ, "STEMMA_HOME": str(ws.settings.home), "STEMMA_REGISTRY_URL": ws.settings.registry_url}
    cmd = [sys.executable, "-m", "stemma.footprint", version_id, "--new-tokens", str(new_tokens),
           "--batch", str(batch)]
    if context:
        cmd += ["--context", str(context)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StemmaError(f"measuring {v.row.node_path}@{v.short} took longer than {timeout:.0f}s") from None
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or ["no output"])[-1]
        raise StemmaError(f"measuring {v.row.node_path}@{v.short} failed: {tail}")
    got = json.loads(p.stdout.strip().splitlines()[-1])
    return Footprint(disk_bytes=disk_bytes(ws, version_id), machine=machine_profile(), **got)


def record(ws, version_id: str, fp: Footprint) -> None:
    """Store a footprint as metrics of the version (one set per version: the newest measurement wins)."""
    details = {k: v for k, v in asdict(fp).items() if k not in METRICS}
    for name in METRICS:
        ws.put_metric(version_id, PREFIX + name, None, None, float(getattr(fp, name)), details=details)


def ensure(ws, version_id: str, **kwargs) -> Footprint:
    """The stored footprint of a version, measuring and storing it first if there is none."""
    fp = stored(ws, version_id)
    if fp is None:
        fp = measure(ws, version_id, **kwargs)
        record(ws, version_id, fp)
    return fp


def stored(ws, version_id: str) -> Footprint | None:
    rows = {m.name[len(PREFIX):]: m for m in ws.metrics_of(version_id) if m.name.startswith(PREFIX)}
    if any(n not in rows for n in METRICS):
        return None
    d = rows[METRICS[0]].details or {}
    vals = {n: rows[n].value for n in METRICS}
    for n in ("disk_bytes", "rss_load_bytes", "rss_generate_bytes"):
        vals[n] = int(vals[n])
    return Footprint(**vals, context=d.get("context", 0), new_tokens=d.get("new_tokens", 0), batch=d.get("batch", 0),
                     machine=d.get("machine", {}))


# ---------------------------------------------------------------------------------------------- the child
def _child(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("version")
    ap.add_argument("--context", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    import torch

    from .models.arch import model_context
    from .workspace import Workspace

    ws = Workspace.open()
    model = ws.load_model(args.version)
    rss_load = _proc_status("VmHWM")
    context = args.context or model_context(model)
    new = max(1, min(args.new_tokens, context // 2))
    prompt_len = context - new
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def decode(rows: int) -> float:
        ids = torch.randint(0, vocab, (rows, prompt_len), generator=g)
        kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        with torch.inference_mode():
            model.generate(ids[:, : max(1, prompt_len // 4)], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2,
                                                                   "attention_mask": None})  # warm-up
            t0 = time.perf_counter()
            model.generate(ids, **kw)
            return rows * new / (time.perf_counter() - t0)

    single = decode(1)
    batched = decode(args.batch)
    return {"rss_load_bytes": rss_load, "rss_generate_bytes": _proc_status("VmHWM"), "tokens_per_s": single,
            "tokens_per_s_batched": batched, "context": context, "new_tokens": new, "batch": args.batch}


if __name__ == "__main__":  # pragma: no cover - exercised through `measure`
    from .models import quiet_transformers

    quiet_transformers()
    print(json.dumps(_child()))
