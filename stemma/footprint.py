"""Footprints: what a version costs on a machine, measured, never estimated, per runtime.

A device runs a runtime: ``torch`` (stemma itself, PyTorch) or ``llamacpp`` (llama.cpp on a GGUF pull). For each
version and runtime: bytes on disk, peak resident memory to load it and to generate at its full context length,
and decode tokens/s. Each measurement runs in a fresh child process, so the resident memory is that of a real
process that imported only that runtime and loaded only this model (Python + torch, or Python + llama.cpp: that is
what a device must hold).

- ``torch``: everything loading the version reads (for an adapter, its chain down from the nearest full model);
  decode single-stream and batched. Metrics ``footprint.<name>`` (`METRICS`).
- ``llamacpp``: the version's GGUF at each of `GGUF_FORMATS` (``f32``, ``f16``, and ``q8_0`` from llama.cpp's own
  quantizer; llama.cpp has no type holding stemma's int4 layout, so an int4 variant is measured at those three
  too, never as int4), loaded by llama-cpp-python with this machine's threads and the model's context. Metrics
  ``footprint.llamacpp.<format>.<name>`` (`LLAMACPP_METRICS`, disk = the GGUF file). A version llama.cpp cannot
  run (the GGUF writer refuses its family or tokenizer) gets ``footprint.llamacpp.refused`` (value 0) whose
  details hold the reason, and no numbers.

The numbers are stored as metrics of the version together with a description of the machine, whose GEMM speed
lets the selector scale tokens/s to another machine.

    python -m stemma.footprint VERSION_ID [--context N] [--new-tokens N] [--batch N]   (torch; prints JSON)
    python -m stemma.footprint --gguf FILE --context N [--new-tokens N] [--threads N]  (llama.cpp; prints JSON)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import StemmaError

METRICS = ("disk_bytes", "rss_load_bytes", "rss_generate_bytes", "tokens_per_s", "tokens_per_s_batched")
PREFIX = "footprint."
RUNTIMES = ("torch", "llamacpp")
GGUF_FORMATS = ("f32", "f16", "q8_0")
LLAMACPP_METRICS = ("disk_bytes", "rss_load_bytes", "rss_generate_bytes", "tokens_per_s")
LLAMACPP_PREFIX = PREFIX + "llamacpp."
REFUSED = LLAMACPP_PREFIX + "refused"


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

    runtime = "torch"
    fmt = "stemma"
    """What the runtime loads: the version's own stored form."""

    @property
    def ms_per_token(self) -> float:
        return 1000.0 / self.tokens_per_s if self.tokens_per_s > 0 else float("inf")


@dataclass(frozen=True)
class LlamaFootprint:
    """One version's measured cost in llama.cpp, as a GGUF of one type, on one machine."""

    fmt: str
    """GGUF type: ``f32``, ``f16`` or ``q8_0``."""
    disk_bytes: int
    """Size of the GGUF file."""
    rss_load_bytes: int
    """Peak resident memory of a process that imported llama-cpp-python and loaded the file."""
    rss_generate_bytes: int
    """Peak resident memory after also generating at ``context`` tokens."""
    tokens_per_s: float
    """Greedy decode speed, one stream."""
    context: int
    new_tokens: int
    threads: int
    machine: dict[str, Any]
    note: str = ""
    """What the file is not (e.g. an int4 variant's q8_0 is not its own precision)."""

    runtime = "llamacpp"

    @property
    def precision(self) -> int:
        """0 for f32 (the version's weights), 1 for f16, 2 for q8_0."""
        return GGUF_FORMATS.index(self.fmt)

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
    got = _run_child(cmd, env, f"{v.label}", timeout)
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


# ---------------------------------------------------------------------------------------------- llama.cpp
def llamacpp_available() -> bool:
    """Whether llama-cpp-python imports here (it measures the ``llamacpp`` runtime)."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def _run_child(cmd: list[str], env: dict, label: str, timeout: float) -> dict[str, Any]:
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StemmaError(f"measuring {label} took longer than {timeout:.0f}s") from None
    if p.returncode != 0:
        tail = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        raise StemmaError(f"measuring {label} failed: {tail}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _gguf_note(v, fmt: str) -> str:
    variant = (v.manifest.get("architecture") or {}).get("variant") or {}
    bits = variant.get("bits") if variant.get("method") == "quantized" else None
    if bits == 4:
        return (f"int4 variant as {fmt}: llama.cpp has no type holding stemma's int4 layout" +
                (" (q8_0 re-quantises its int4 values)" if fmt == "q8_0" else " (its int4 values expanded)"))
    if bits == 8 and fmt != "q8_0":
        return f"int8 variant as {fmt}: its int8 values expanded (q8_0 is its own precision)"
    return ""


class GGUFRefused(StemmaError):
    """The GGUF writer (or llama.cpp's quantizer) refuses the version: llama.cpp cannot run it."""


@contextlib.contextmanager
def gguf_files(ws, v, fmts=GGUF_FORMATS) -> Iterator[dict[str, Path]]:
    """The version's GGUF at each of ``fmts``, written once (the model loaded once) into one temporary directory
    that is removed on leaving: the files both `measure_llamacpp` and the evaluator's GGUF perplexity run. Raises
    `GGUFRefused` when the writer refuses the version."""
    from . import pull

    with tempfile.TemporaryDirectory(prefix="stemma-gguf-") as d:
        try:
            files = pull.write_gguf_types(ws, v, Path(d), fmts)
        except StemmaError as e:
            raise GGUFRefused(str(e)) from e
        yield files


def measure_llamacpp(ws, version_id: str, new_tokens: int = 32, threads: int | None = None,
                     timeout: float = 600, files: dict[str, Path] | None = None) -> dict[str, LlamaFootprint] | str:
    """Measure the version's GGUF at each of `GGUF_FORMATS` in a fresh llama.cpp child process each; returns the
    footprints by format, or why llama.cpp cannot run the version. ``files``: the GGUFs already written by
    `gguf_files` (else they are written here, into a temporary directory)."""
    v = ws.version(version_id)
    if files is None:
        try:
            with gguf_files(ws, v, GGUF_FORMATS) as written:
                return measure_llamacpp(ws, version_id, new_tokens, threads, timeout, written)
        except GGUFRefused as e:
            return str(e)
    arch = v.manifest.get("architecture") or {}
    label = f"{v.label} in llama.cpp"
    machine = machine_profile()
    threads = threads or int(machine.get("threads") or os.cpu_count() or 1)
    out: dict[str, LlamaFootprint] = {}
    for fmt in GGUF_FORMATS:
        path = files[fmt]
        cmd = [sys.executable, "-m", "stemma.footprint", "--gguf", str(path), "--new-tokens", str(new_tokens),
               "--threads", str(threads)]
        if arch.get("context"):
            cmd += ["--context", str(int(arch["context"]))]
        got = _run_child(cmd, dict(os.environ), f"{label} ({fmt})", timeout)
        out[fmt] = LlamaFootprint(fmt=fmt, disk_bytes=path.stat().st_size, machine=machine,
                                  note=_gguf_note(v, fmt), **got)
    return out


def record_llamacpp(ws, version_id: str, fps: dict[str, LlamaFootprint] | str) -> None:
    """Store llama.cpp footprints (or the reason there are none) as metrics of the version."""
    if isinstance(fps, str):
        ws.put_metric(version_id, REFUSED, None, None, 0.0, details={"reason": fps})
        return
    for fmt, fp in fps.items():
        details = {k: v for k, v in asdict(fp).items() if k not in LLAMACPP_METRICS}
        for name in LLAMACPP_METRICS:
            ws.put_metric(version_id, f"{LLAMACPP_PREFIX}{fmt}.{name}", None, None, float(getattr(fp, name)),
                          details=details)


def stored_llamacpp(ws, version_id: str) -> dict[str, LlamaFootprint] | str | None:
    """The stored llama.cpp footprints by format, the stored reason llama.cpp cannot run the version, or None."""
    rows = {m.name: m for m in ws.metrics_of(version_id) if m.name.startswith(LLAMACPP_PREFIX)}
    if REFUSED in rows:
        return str((rows[REFUSED].details or {}).get("reason", "llama.cpp cannot run it"))
    out: dict[str, LlamaFootprint] = {}
    for fmt in GGUF_FORMATS:
        names = [f"{LLAMACPP_PREFIX}{fmt}.{n}" for n in LLAMACPP_METRICS]
        if any(n not in rows for n in names):
            continue
        d = rows[names[0]].details or {}
        vals = {n: rows[f"{LLAMACPP_PREFIX}{fmt}.{n}"].value for n in LLAMACPP_METRICS}
        for n in ("disk_bytes", "rss_load_bytes", "rss_generate_bytes"):
            vals[n] = int(vals[n])
        out[fmt] = LlamaFootprint(fmt=fmt, **vals, context=d.get("context", 0), new_tokens=d.get("new_tokens", 0),
                                  threads=d.get("threads", 0), machine=d.get("machine", {}), note=d.get("note", ""))
    return out or None


def ensure_llamacpp(ws, version_id: str, **kwargs) -> dict[str, LlamaFootprint] | str | None:
    """The stored llama.cpp footprints (or refusal), measuring and storing them first if there are none and
    llama-cpp-python imports here (None when it does not)."""
    got = stored_llamacpp(ws, version_id)
    if got is None and llamacpp_available():
        got = measure_llamacpp(ws, version_id, **kwargs)
        record_llamacpp(ws, version_id, got)
    return got


# ---------------------------------------------------------------------------------------------- the children
def open_gguf(path, extra_bufts: bool = False, **kwargs):
    """A ``llama_cpp.Llama`` on a GGUF file (``kwargs``: its constructor's), as stemma opens every GGUF (footprints,
    perplexities, tests, benchmarks).

    The policy: the CPU backend's extra (repacked) weight buffers are off for every type. On AMX CPUs
    llama-cpp-python 0.3.36 repacks q8_0 matrices for AMX and segfaults at the first decode (llama.cpp issue
    #20824); f32 and f16 matrices have no repacked layout on x86, so they lose nothing, and every type is measured
    the same way. ``extra_bufts=True`` restores llama.cpp's default (for a CPU or a type the crash does not reach).
    """
    import llama_cpp
    from llama_cpp import llama as runtime

    default = runtime.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    runtime.llama_cpp.llama_model_default_params = params
    try:
        return llama_cpp.Llama(str(path), verbose=False, seed=0, **kwargs)
    finally:
        runtime.llama_cpp.llama_model_default_params = default


def _llamacpp_child(args) -> dict[str, Any]:
    """Load a GGUF in llama.cpp, generate at the full context; only llama-cpp-python is imported."""
    import random

    llm = open_gguf(args.gguf, n_ctx=args.context or 0, n_threads=args.threads or None,
                    n_threads_batch=args.threads or None)
    rss_load = _proc_status("VmHWM")
    context = args.context or llm.n_ctx()  # llama.cpp may pad n_ctx: positions stay within the model's
    new = max(2, min(args.new_tokens, context // 2))
    rnd = random.Random(0)
    prompt = [rnd.randrange(llm.n_vocab()) for _ in range(context - new)]
    llm.eval(prompt[: max(1, len(prompt) // 4)])  # warm-up
    llm.reset()
    n, t0 = 0, 0.0
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        n += 1
        if n == 1:
            t0 = time.perf_counter()  # the prompt is in: time the decoding only
        if n == new:
            break
    tps = (n - 1) / (time.perf_counter() - t0)
    return {"rss_load_bytes": rss_load, "rss_generate_bytes": _proc_status("VmHWM"), "tokens_per_s": tps,
            "context": context, "new_tokens": new, "threads": args.threads or llm.n_threads}


def _child(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser()
    ap.add_argument("version", nargs="?")
    ap.add_argument("--gguf")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--context", type=int, default=0)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args(argv)
    if args.gguf:
        return _llamacpp_child(args)
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
    if "--gguf" not in sys.argv:
        from .models import quiet_transformers

        quiet_transformers()
    print(json.dumps(_child()))
