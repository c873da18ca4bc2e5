"""Per-row LoRA for the serving decoder: adapters converted from PEFT, stacked in a bank, planned per batch.

Per-row LoRA follows S-LoRA / Punica (Sheng et al., 2023; Chen et al., 2023): every loaded adapter's A and B
matrices are stacked in a `LoraBank`; a `LoraPlan` groups the batch's rows by adapter (SGMV) and adds
``(x @ A[id]) @ B[id]`` to the base output ``x @ W + b`` of every row in two batched matmuls. Slot 0 is no
adapter, so base-model rows ride in the same batch and skip the LoRA work. While the bank is small, the A
matrices of all loaded adapters are extra columns of the base weights (`stemma.serve.decoder.Decoder`), so for a
mixed batch one GEMM gives ``x @ W`` and every ``x @ A``; each row keeps its own adapter's columns and one more
GEMM (one per part, see below) adds ``@ B``. A chain (a LoRA trained on a LoRA-merged parent) is pre-combined
once at load by concatenating ranks (``A = [A1 A2]``, ``B = [s1*B1; s2*B2]``), which is the exact sum of the
deltas, with no merge rounding.

Orientation: PEFT keeps ``lora_A.weight`` as ``[r, in]`` and ``lora_B.weight`` as ``[out, r]`` (also on GPT-2's
``Conv1D``, where ``fan_in_fan_out=True`` only changes merging) and computes ``lora_B(lora_A(x)) * alpha / r``;
the bank stores ``A.T`` (``[in, r]``) and ``scale * B.T`` (``[r, out]``). A projection that is a column slice of
a fused decoder linear (Llama's k_proj inside ``attn.qkv``) is a *part* of that linear: its B covers only its own
columns (``[r, width]``, no zero padding to the fused width), and the A's of a linear's parts sit side by side
along the rank, so ``x @ A`` is one GEMM for all of them and each part's ``@ B`` adds into its column slice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from ..errors import StemmaError
from ..models.families.serving import DecoderShape, LoraSite

FUSED_COLUMNS = 128
"""While every block linear's share of the adapter bank is at most this many rank columns (e.g. 8 adapters of
rank 16), the bank's A matrices are extra columns of each block weight (`Decoder._sync_fused`): a mixed batch
computes every row's ``x @ A`` of every loaded adapter in the base GEMM itself, which costs next to nothing there,
instead of a separate small GEMM per linear that runs far below the machine's peak."""


RUN_ROWS = 32
"""Rows per adapter, on average, from which a batch whose rows come in one run per adapter takes plain matmuls on
each run's rows instead of the grouped batched matmuls (`LoraPlan.runs`). Prefill's packed prompts have runs of
hundreds of tokens; a decode batch's rows are seldom in runs, and its groups are a few rows each, where one batched
matmul per linear beats one call per adapter."""


class LoraPart(NamedTuple):
    """The LoRA of one projection: its delta lands in output columns ``column .. column + width`` of a decoder
    linear."""

    column: int
    a: torch.Tensor
    """[in, r]."""
    b: torch.Tensor
    """[r, width], the scaling folded in."""


@dataclass
class LoraDelta:
    """One servable adapter (possibly a pre-combined chain): per decoder linear, its parts (one per projection,
    sorted by column)."""

    parts: dict[tuple[int, str], tuple[LoraPart, ...]]
    """(layer, linear) -> parts."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ps in self.parts.values() for p in ps for t in (p.a, p.b))

    def rank(self) -> int:
        return max(self.ranks().values(), default=0)

    def ranks(self) -> dict[str, int]:
        """Rank per decoder linear, its parts' ranks summed (the largest over layers)."""
        out: dict[str, int] = {}
        for (_, name), ps in self.parts.items():
            out[name] = max(out.get(name, 0), sum(p.a.shape[1] for p in ps))
        return out

    def layout(self) -> dict[str, dict[int, tuple[int, int]]]:
        """Per decoder linear: column -> (width, rank) of each part (the largest rank over layers)."""
        out: dict[str, dict[int, tuple[int, int]]] = {}
        for (_, name), ps in self.parts.items():
            lay = out.setdefault(name, {})
            for p in ps:
                lay[p.column] = (p.b.shape[1], max(lay.get(p.column, (0, 0))[1], p.a.shape[1]))
        return out

    @staticmethod
    def concat(deltas: list[LoraDelta]) -> LoraDelta:
        """The exact sum of several deltas as one delta of the summed rank (an adapter chain): the parts on the
        same columns are concatenated along the rank."""
        keys = sorted({k for d in deltas for k in d.parts})
        out = {}
        for k in keys:
            by_column: dict[int, list[LoraPart]] = {}
            for d in deltas:
                for p in d.parts.get(k, ()):
                    by_column.setdefault(p.column, []).append(p)
            out[k] = tuple(LoraPart(c, torch.cat([p.a for p in ps], dim=1), torch.cat([p.b for p in ps], dim=0))
                           if len(ps) > 1 else ps[0] for c, ps in sorted(by_column.items()))
        return LoraDelta(parts=out)


def lora_from_peft(tensors: dict[str, torch.Tensor], adapter_config: dict, shape: DecoderShape,
                   site: Callable[[str], LoraSite | None]) -> LoraDelta:
    """Convert PEFT ``adapter_model.safetensors`` tensors into a `LoraDelta`.

    Args:
        tensors: the adapter's tensors (``base_model.model.<module path>.lora_A.weight`` ...).
        adapter_config: its ``adapter_config.json``.
        shape: the base's decoder shape.
        site: module path (``model.layers.3.self_attn.k_proj``) -> where it lands in the decoder, or None when
            it is no block linear (the family's ``lora_site``).
    """
    for flag in ("use_dora", "use_rslora"):
        if adapter_config.get(flag):
            raise StemmaError(f"serving does not support LoRA adapters with {flag}")
    if adapter_config.get("peft_type", "LORA") != "LORA":
        raise StemmaError(f"serving supports LoRA adapters only, not {adapter_config.get('peft_type')}")
    r, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    rank_pattern, alpha_pattern = adapter_config.get("rank_pattern") or {}, adapter_config.get("alpha_pattern") or {}
    if rank_pattern or alpha_pattern:
        raise StemmaError("serving does not support LoRA adapters with rank_pattern / alpha_pattern")
    scale = alpha / r
    parts: dict[tuple[int, str], list[LoraPart]] = {}
    for key, t in tensors.items():
        if ".lora_A." not in key:
            if ".lora_B." in key:
                continue
            raise StemmaError(f"unexpected tensor {key!r} in a LoRA adapter (only lora_A/lora_B are served)")
        prefix = key.split(".lora_A.")[0]
        where = site(prefix.removeprefix("base_model.model."))
        if where is None:
            raise StemmaError(f"LoRA tensor {key!r} does not target a block linear of the serving decoder")
        lb = tensors.get(prefix + ".lora_B.weight")
        if lb is None:
            raise StemmaError(f"LoRA adapter has {key} but no matching lora_B")
        d_in, _ = shape.linear_dims(where.linear)
        if tuple(t.shape) != (r, d_in) or tuple(lb.shape) != (where.width, r):
            raise StemmaError(f"LoRA tensor shapes {tuple(t.shape)}/{tuple(lb.shape)} do not fit {prefix} "
                              f"({d_in}->{where.width}, r={r})")
        part = LoraPart(where.column, t.float().t().contiguous(), (lb.float() * scale).t().contiguous())
        parts.setdefault((where.layer, where.linear), []).append(part)
    return LoraDelta(parts={k: tuple(sorted(ps, key=lambda p: p.column)) for k, ps in parts.items()})


class BankPart(NamedTuple):
    """Where one projection's LoRA sits in a bank linear."""

    column: int
    """First output column in the decoder linear."""
    width: int
    offset: int
    """First rank column of its A inside the linear's A."""
    rank: int


class LoraBank:
    """Stacked adapters of one base: per block linear, ``A [in, slots, R]`` and, per part, ``B [slots, r, width]``.

    Slot 0 is the zero adapter and takes no memory: adapter slot ``s`` is index ``s - 1`` of the stacks. A
    linear's R is the sum of its parts' ranks (a Llama adapter on q, k and v has three parts in ``attn.qkv``);
    adapters of smaller rank are zero-padded to it (a zero column of A and row of B add nothing), and a linear no
    adapter touches holds nothing. A's slot axis sits between ``in`` and the rank so that the A's of consecutive
    slots are one ``[in, slots * R]`` matrix without a copy (the fused columns); each B's
    slots are likewise one ``[slots * r, width]`` matrix. The bank grows by whole slots when full; freed slots
    are reused.
    """

    def __init__(self, shape: DecoderShape):
        self.shape = shape
        self.layout: dict[str, tuple[BankPart, ...]] = {}
        """Decoder linear -> its parts, by column."""
        self.rank: dict[str, int] = {}
        """Decoder linear -> R (its parts' ranks summed)."""
        self.a: dict[tuple[int, str], torch.Tensor | None] = {}
        """(layer, linear) -> [in, n_slots - 1, R]; None while the decoder's fused columns hold it (change the bank
        through `Decoder.add_adapter` / `remove_adapter`, which bring it back first)."""
        self.b: dict[tuple[int, str], tuple[torch.Tensor, ...]] = {}
        """(layer, linear) -> per part [n_slots - 1, r, width]."""
        self.n_slots = 1  # the zero adapter
        self.free: list[int] = []
        self.version = 0
        """Bumped on every change, so cached gathers of the bank's weights are never stale."""
        self._kernel_args: dict[tuple, tuple[int, object]] = {}
        """(what, linear) -> (version, the kernel's view of it): `kernel_parts`, `b_addresses`."""

    @property
    def nbytes(self) -> int:
        """Bytes of the stacks held here (an A held by the decoder's fused columns is counted there)."""
        tensors = [*(a for a in self.a.values() if a is not None), *(b for bs in self.b.values() for b in bs)]
        return sum(t.numel() * t.element_size() for t in tensors)

    @staticmethod
    def _parts(lay: dict[int, tuple[int, int]]) -> tuple[BankPart, ...]:
        out, offset = [], 0
        for column, (width, rank) in sorted(lay.items()):
            out.append(BankPart(column, width, offset, rank))
            offset += rank
        return tuple(out)

    def _resize(self, n_slots: int, layout: dict[str, tuple[BankPart, ...]]) -> None:
        """Reallocate for ``n_slots`` and ``layout`` (a superset of the current one), keeping what is stored;
        one (layer, linear) at a time, so the old and new bank never coexist whole."""
        n = n_slots - 1
        for name, parts in layout.items():
            d_in, _ = self.shape.linear_dims(name)
            R = sum(p.rank for p in parts)
            old_parts = {p.column: (i, p) for i, p in enumerate(self.layout.get(name, ()))}
            for layer in range(self.shape.n_layer):
                k = (layer, name)
                a = torch.zeros(d_in, n, R)
                bs = tuple(torch.zeros(n, p.rank, p.width) for p in parts)
                if k in self.a:
                    old_a, old_bs = self.a[k], self.b[k]
                    m = old_a.shape[1]
                    for p, b in zip(parts, bs):
                        if p.column in old_parts:
                            i, q = old_parts[p.column]
                            a[:, :m, p.offset : p.offset + q.rank] = old_a[:, :, q.offset : q.offset + q.rank]
                            b[:m, : q.rank] = old_bs[i]
                    del old_a, old_bs
                self.a[k], self.b[k] = a, bs
        self.n_slots, self.layout = n_slots, layout
        self.rank = {name: sum(p.rank for p in parts) for name, parts in layout.items()}

    def add(self, delta: LoraDelta) -> int:
        """Store an adapter; returns its slot."""
        self.version += 1
        merged = {name: {p.column: (p.width, p.rank) for p in parts} for name, parts in self.layout.items()}
        for name, lay in delta.layout().items():
            have = merged.setdefault(name, {})
            for column, (width, rank) in lay.items():
                if column in have and have[column][0] != width:
                    raise StemmaError(f"LoRA adapters disagree on the width of {name} columns from {column}")
                have[column] = (width, max(rank, have.get(column, (0, 0))[1]))
        layout = {name: self._parts(lay) for name, lay in merged.items()}
        if self.free:
            slot = self.free.pop()
            if layout != self.layout:
                self._resize(self.n_slots, layout)
        else:
            slot = self.n_slots
            self._resize(self.n_slots + 1, layout)
        j = slot - 1
        self._zero(j)
        for k, ps in delta.parts.items():
            where = {p.column: (i, p) for i, p in enumerate(self.layout[k[1]])}
            a, bs = self.a[k], self.b[k]
            for part in ps:
                i, p = where[part.column]
                r = part.a.shape[1]
                a[:, j, p.offset : p.offset + r] = part.a
                bs[i][j, :r] = part.b
        return slot

    def kernel_parts(self, name: str) -> tuple[torch.Tensor, ...]:
        """int64 columns, widths, rank offsets and ranks of a linear's parts, as `stemma.serve.kernels` reads them."""
        return self._kernel_arg(("parts", name), lambda: tuple(
            torch.tensor([getattr(p, f) for p in self.layout[name]], dtype=torch.int64)
            for f in ("column", "width", "offset", "rank")))

    def b_addresses(self, key: tuple[int, str]) -> torch.Tensor:
        """int64 address of each part's B stack of a (layer, linear), as `stemma.serve.kernels` reads them."""
        return self._kernel_arg(("b", key),
                                lambda: torch.tensor([b.data_ptr() for b in self.b[key]], dtype=torch.int64))

    def _kernel_arg(self, key: tuple, make: Callable[[], object]):
        got = self._kernel_args.get(key)
        if got is None or got[0] != self.version:
            got = self._kernel_args[key] = (self.version, make())
        return got[1]

    def _zero(self, j: int) -> None:
        for k, a in self.a.items():
            a[:, j].zero_()
            for b in self.b[k]:
                b[j].zero_()

    def remove(self, slot: int) -> None:
        self.version += 1
        self._zero(slot - 1)
        self.free.append(slot)


@dataclass
class LoraPlan:
    """How a batch's rows map to adapters, worked out once per batch composition.

    Rows are grouped by adapter and each group padded to the largest group's size ``L``, so every adapted
    linear is batched matmuls over the ``G`` adapters present (``[G, L*T, in] @ [G, in, R]``, then per part
    ``@ [G, r, width]``): each adapter's weights are read once per step, not copied per row, and the op count does
    not grow with the number of adapters. When the batch's slots are consecutive, its adapters' weights are slices
    of the bank; otherwise they are gathered once here and reused while the batch is unchanged.

    Rows that come in long runs of one adapter each (every row alike, or prefill's packed tokens, which it orders
    by adapter) need no grouping: each run's LoRA is plain matmuls on its slice of the rows (`runs`), with no
    gather, scatter or padding.
    """

    uniform: int | None = None
    """The one adapter slot every row uses, if they all use the same one."""
    runs: tuple[tuple[int, int, int], ...] | None = None
    """(adapter slot, first row, end row) of each run of rows with one adapter, base rows left out; when set, the
    grouped form below is unused."""
    idx: torch.Tensor | None = None
    """[G*L] batch row of each padded position (padding repeats a real row; no row reads its result)."""
    inverse: torch.Tensor | None = None
    """[B] padded position of each batch row (a base row: position 0, its result masked out by `rowmask`)."""
    slots: torch.Tensor | None = None
    """[G] adapter slot of each group."""
    groups: int = 0
    width: int = 0
    """L: rows per group after padding."""
    contiguous: bool = False
    """The batch's adapter slots are consecutive: their weights are slices of the bank, never copied."""
    weights: dict = field(default_factory=dict)
    """(layer, linear) -> (A [in, G, R], per part B [G, r, width]) gathered from the bank, when the slots are not
    consecutive; filled on first use."""
    aids: torch.Tensor | None = None
    """[B] adapter slot per row."""
    colmasks: dict = field(default_factory=dict)
    """Cached `slotmask` / `rowmask` results."""
    kernel_groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """The grouped form as `stemma.serve.kernels` reads it (int64): adapter index (slot - 1) of each group, each
    group's first entry in the rows below (and the end), and the batch's rows with an adapter in group order."""

    @staticmethod
    def of(aids: torch.Tensor) -> LoraPlan | None:
        """None when no row has an adapter (the LoRA path is skipped entirely)."""
        first, B = int(aids[0]), len(aids)
        if bool((aids == first).all()):
            return None if first == 0 else LoraPlan(uniform=first, runs=((first, 0, B),))
        bounds = [0, *(torch.nonzero(aids[1:] != aids[:-1]).view(-1) + 1).tolist(), B]
        runs = [(int(aids[lo]), lo, hi) for lo, hi in zip(bounds, bounds[1:])]
        if len({s for s, _, _ in runs}) == len(runs) and B >= RUN_ROWS * len(runs):
            return LoraPlan(runs=tuple(r for r in runs if r[0]), aids=aids)
        rows = torch.nonzero(aids, as_tuple=True)[0]
        slots, counts = torch.unique(aids[rows], return_counts=True)
        G, L = len(slots), int(counts.max())
        idx = torch.zeros(G, L, dtype=torch.long)
        inverse = torch.zeros_like(aids)
        for g, slot in enumerate(slots.tolist()):
            members = rows[aids[rows] == slot]
            idx[g, : len(members)] = members
            idx[g, len(members) :] = members[0]
            inverse[members] = g * L + torch.arange(len(members))
        contiguous = int(slots[-1]) - int(slots[0]) + 1 == G  # torch.unique sorts
        starts = torch.zeros(G + 1, dtype=torch.int64)
        starts[1:] = counts.cumsum(0)
        in_groups = rows[torch.sort(aids[rows], stable=True).indices]
        kernel_groups = ((slots - 1).to(torch.int64), starts, in_groups.to(torch.int64).contiguous())
        return LoraPlan(idx=idx.view(-1), inverse=inverse, slots=slots, groups=G,
                        width=L, aids=aids, contiguous=contiguous, kernel_groups=kernel_groups)

    def select(self, bank: LoraBank, key: tuple[int, str]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The batch's adapters of one bank linear, in group order: A [in, G, R] and per part B [G, r, width];
        slices of the bank when the slots are consecutive, else gathered once per batch composition."""
        a, bs = bank.a[key], bank.b[key]
        if self.contiguous:
            lo = int(self.slots[0]) - 1
            return a[:, lo : lo + self.groups], tuple(b[lo : lo + self.groups] for b in bs)
        got = self.weights.get(key)
        if got is None:
            j = self.slots - 1
            got = self.weights[key] = (a[:, j], tuple(b[j] for b in bs))
        return got

    def slotmask(self, cols: int, rank: int) -> torch.Tensor:
        """[B, cols] 1 where a column of the bank's stacked adapters (slot s: columns (s-1)*rank .. s*rank)
        belongs to the row's adapter."""
        return self._mask(("slots", cols, rank), torch.arange(cols) // rank + 1, self.aids)

    def rowmask(self) -> torch.Tensor | None:
        """[B, 1, 1] 1 for rows with an adapter, 0 for base rows; None when every row has one."""
        if "rows" not in self.colmasks:
            has = self.aids > 0
            self.colmasks["rows"] = None if bool(has.all()) else has.float().view(-1, 1, 1)
        return self.colmasks["rows"]

    def _mask(self, key: tuple, column_owner: torch.Tensor, row_owner: torch.Tensor) -> torch.Tensor:
        m = self.colmasks.get(key)
        if m is None:
            m = self.colmasks[key] = (column_owner[None, :] == row_owner[:, None]).float()
        return m
