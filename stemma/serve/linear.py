"""The serving decoder's linear layer: ``y = x @ W + b`` from a weight oneDNN has packed for this machine."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _onednn_packing() -> bool:
    """Whether this PyTorch can keep a weight in oneDNN's packed layout and multiply by it."""
    try:
        return torch.backends.mkldnn.is_available() and callable(torch.ops.mkldnn._reorder_linear_weight) \
            and callable(torch.ops.mkldnn._linear_pointwise)
    except (AttributeError, RuntimeError):
        return False


PACKED = _onednn_packing()
"""Serve the decoder's GEMMs from weights packed by oneDNN. PyTorch's plain fp32 ``addmm`` runs on MKL, which
on non-Intel CPUs takes a generic path; measured on a 2-core AMD EPYC with AVX-512, a packed
oneDNN linear ran the serving shapes (64 x 256 x 832 .. 3000 x 256 x 832) 1.6-2.3x faster. PyTorch exposes
the packed linear only as the ``mkldnn`` operators its compiler uses (no public module wraps it), hence `Linear`."""
_PACKED_LINEAR = torch.ops.mkldnn._linear_pointwise.default if PACKED else None
PACK_ROWS = 64
"""Rows oneDNN is told to expect when it chooses the packed layout (any row count works)."""


def padded_rows(m: int) -> int:
    """The row count an input of ``m`` rows is padded to: oneDNN builds a kernel per input shape (0.3-0.6 ms,
    measured) and caches 1024, so prefill's packed prompts (any number of tokens) would otherwise keep building new
    ones. Up to PACK_ROWS rows (decode's batches) are taken as they are; above, to a multiple of the largest power
    of two from 16 up that is at most 1/32 of the rows: at most 32 shapes per doubling of the row count, and at most
    ~3% of the rows are padding (a fixed multiple of 64 padded prefill's ~600-token chunks by 8%, each padding
    row costing what a real one does)."""
    if m <= PACK_ROWS:
        return m
    step = 16
    while step * 64 <= m:
        step *= 2
    return -(-m // step) * step


class Linear:
    """One linear layer, ``y = x @ W + b`` with W [in, n], its weight packed by oneDNN when `PACKED` (else kept as
    a plain contiguous tensor for ``addmm``).

    A block linear may carry extra columns after its first ``out`` (the fused adapters' A's, see
    `stemma.serve.decoder.Decoder._sync_fused`); callers slice them off.

    The weight is always a copy of its own, never a view of ``w``.

    Args:
        w: [in, n]; any layout (a transposed view of an ``nn.Linear`` weight packs without an extra copy).
        bias: [n] or None.
    """

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        self.d_in, self.n = w.shape
        self.bias = bias
        self.packed = PACKED
        if self.packed:  # oneDNN takes nn.Linear's [out, in]
            self.w = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), PACK_ROWS)
        else:
            self.w = w.contiguous()
            if self.w.data_ptr() == w.data_ptr():
                self.w = self.w.clone()  # a copy of its own: the caller's tensor (a model's weight) can be freed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[M, in] -> [M, n]."""
        if self.packed:
            m = x.shape[0]
            pad = padded_rows(m) - m
            y = _PACKED_LINEAR(F.pad(x, (0, 0, 0, pad)) if pad else x, self.w, self.bias, "none", [], "")
            return y[:m] if pad else y
        return x @ self.w if self.bias is None else torch.addmm(self.bias, x, self.w)

    def dense(self) -> torch.Tensor:
        """The weight as a plain [in, n] tensor (a copy when packed)."""
        return self.w.to_dense().t() if self.packed else self.w

    @property
    def nbytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.d_in * self.n * 4 + bias
