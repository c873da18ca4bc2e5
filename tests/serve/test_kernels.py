"""The compiled per-row LoRA kernel (`stemma.serve.kernels`) against the LoRA it computes, written plainly."""

import shutil
import sys

import pytest
import torch

from stemma.serve import kernels
from stemma.serve.lora import LoraBank, LoraDelta, LoraPart, LoraPlan


class _Shape:
    """The part of a `DecoderShape` the bank reads."""

    n_layer = 1

    def __init__(self, dims):
        self.dims = dims

    def linear_dims(self, name):
        return self.dims[name]


def test_kernel_builds_where_a_compiler_is():
    """On Linux with a C compiler the kernel is built and loaded (else serving silently takes the slower path)."""
    if not sys.platform.startswith("linux") or not any(shutil.which(c) for c in ("cc", "gcc", "clang")):
        pytest.skip("no C compiler here")
    assert kernels.sgmv() is not None


@pytest.mark.parametrize(("d_in", "parts"), [
    (40, [(0, 70, 16), (70, 24, 16), (94, 24, 16)]),  # three parts of one fused linear (q, k, v), R = 48
    (33, [(0, 130, 24)]),  # a rank without a specialised loop, widths not a multiple of the column block
    (64, [(0, 64, 8), (64, 200, 72)]),  # R = 80
    (17, [(0, 9, 16)]),
])
def test_kernel_equals_lora(d_in, parts):
    """Rows of several adapters (unequal groups, slots not consecutive, base rows left alone, rows of x and y
    wider than the linear) get exactly their own adapter's delta."""
    fn = kernels.sgmv()
    if fn is None:
        pytest.skip("the kernel is not available here")
    torch.manual_seed(0)
    d_out = max(c + w for c, w, _ in parts)
    bank = LoraBank(_Shape({"lin": (d_in, d_out)}))
    deltas = []
    for _ in range(4):
        delta = LoraDelta(parts={(0, "lin"): tuple(
            LoraPart(c, torch.randn(d_in, r), torch.randn(r, w)) for c, w, r in parts)})
        deltas.append(delta)
        bank.add(delta)
    aids = torch.tensor([3, 0, 1, 3, 3, 1, 0, 4, 3, 1, 3])  # slot 2 unused, 0: base rows
    plan = LoraPlan.of(aids)
    assert plan.kernel_groups is not None
    x = torch.randn(len(aids), d_in + 5)[:, :d_in]  # row stride > in
    full = torch.randn(len(aids), d_out + 3)
    want = full.clone()
    for i, slot in enumerate(aids.tolist()):
        if slot:
            for p in deltas[slot - 1].parts[(0, "lin")]:
                want[i, p.column : p.column + p.b.shape[1]] += (x[i] @ p.a) @ p.b
    kernels.call_sgmv(fn, x, full, bank.a[(0, "lin")], bank.kernel_parts("lin"), bank.b_addresses((0, "lin")),
                      plan.kernel_groups)
    torch.testing.assert_close(full, want, atol=1e-4, rtol=1e-4)
