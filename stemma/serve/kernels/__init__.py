"""Compiled CPU kernels of the serving decoder, built once per machine with its C compiler.

Why by hand: per-row LoRA over rows grouped by adapter (Punica's SGMV) has no CPU implementation in a maintained
library (Punica's, S-LoRA's and vLLM's kernels are CUDA or Triton). In PyTorch ops a mixed decode step is, per
linear, a gather of each adapter's rows, one batched matmul for ``x @ A`` and one per part for ``@ B``, and a gather
back into row order plus an add per part: about 11 small ops per layer, and on the Llama serve bench (64 rows, 8
adapters of rank 16 on all seven projections) they took several times the time the adapters' weights take to
stream from memory. `sgmv.c` does one linear in one call, reading and writing every row in place.

The library is compiled on first use (``cc -O3 -march=native -fopenmp``, a second or so) into
``~/.cache/stemma/kernels`` (or ``$XDG_CACHE_HOME``), named by a hash of the source, the compiler and the CPU, and
loaded with ctypes. It runs its threads on the OpenMP runtime PyTorch has already loaded; when that cannot be
ensured (no C compiler, a failed build, loading it brought another OpenMP runtime, not Linux) or ``STEMMA_KERNELS=0``,
`sgmv` is None and the decoder keeps its PyTorch path, which computes the same.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("sgmv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_OPENMP_LIBS = ("libgomp", "libiomp", "libomp")


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "stemma" / "kernels"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cpu() -> str:
    """What -march=native compiles for: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("model name", "flags", "Features", "CPU part"))]
    return "\n".join(sorted(set(keep)))


def _openmp_runtimes() -> set[str]:
    """Paths of the OpenMP runtimes mapped into this process."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return set()
    paths = {ln.split()[-1] for ln in maps if "/" in ln}
    return {p for p in paths if os.path.basename(p).startswith(_OPENMP_LIBS)}


def _build(cc: str, out: Path) -> None:
    """Compile into a temporary file next to ``out`` and rename it: a concurrent or interrupted build never leaves
    a half-written library under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        subprocess.run([cc, *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True, timeout=120)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("STEMMA_KERNELS", "1") == "0" or not sys.platform.startswith("linux"):
        return None
    cc = _compiler()
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), cc, version, " ".join(FLAGS), _cpu()]).encode())
        path = _cache_dir() / f"sgmv-{key.hexdigest()[:16]}.so"
        if not path.exists():
            _build(cc, path)
        before = _openmp_runtimes()
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError):
        return None
    if _openmp_runtimes() - before:
        # The library brought an OpenMP runtime of its own (PyTorch runs on another, or on none): two thread pools
        # would fight for the cores. (Another package's private runtime, e.g. scikit-learn's, is no concern: the
        # library binds to the runtime already loaded under its name, which is PyTorch's.)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.sgmv.argtypes = [p, i, p, i, i, p, i, i, i, i, p, p, p, p, p, i, p, p, p, p, i]
    lib.sgmv.restype = None
    return lib


def sgmv():
    """The compiled `sgmv` function (see `sgmv.c`), or None where it is not available."""
    lib = _library()
    return None if lib is None else lib.sgmv


def call_sgmv(fn, x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, parts: tuple[torch.Tensor, ...],
              b_addresses: torch.Tensor, groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
    """``y += `` each row's LoRA delta for one linear, in place (`sgmv.c`).

    Args:
        fn: `sgmv()`.
        x: [M, in] fp32 with unit column stride.
        y: [M, >= out] fp32 with unit column stride (the linear's output), added into.
        a: the bank's A of the linear, [in, slots, R] contiguous.
        parts: int64 columns, widths, rank offsets and ranks of the linear's parts (`LoraBank.kernel_parts`).
        b_addresses: int64 address of each part's B, [slots, rank, width] contiguous.
        groups: int64 adapter index (slot - 1) of each group, each group's first entry in the rows (and the end),
            and the batch rows in group order (`LoraPlan.kernel_groups`).
    """
    index, starts, rows = groups
    t = torch.empty(len(rows), a.shape[2])  # x @ A of each row
    fn(x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), x.shape[1],
       a.data_ptr(), a.stride(0), a.stride(1), a.shape[2],
       len(b_addresses), *(t_.data_ptr() for t_ in parts), b_addresses.data_ptr(),
       len(index), index.data_ptr(), starts.data_ptr(), rows.data_ptr(), t.data_ptr(), torch.get_num_threads())
