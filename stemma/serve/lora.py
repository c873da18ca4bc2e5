"""Per-row LoRA for the serving decoder: adapters converted from PEFT, stacked in a bank, planned per batch.

Per-row LoRA follows S-LoRA / Punica (Sheng et al., 2023; Chen et al., 2023): every loaded adapter's A and B
matrices are stacked in a `LoraBank`; a `LoraPlan` groups the batch's rows by adapter (SGMV) and adds
``(x @ A[id]) @ B[id]`` to the base output ``x @ W + b`` of every row in two batched matmuls. Slot 0 is no
adapter, so base-model rows ride in the same batch and skip the LoRA work. While the bank is small, the A
matrices of all loaded adapters are extra columns of the base weights (`stemma.serve.decoder.Decoder`), so for a
mixed batch one GEMM gives ``x @ W`` and every ``x @ A``; each row keeps its own adapter's columns and one more
GEMM adds ``@ B``. A chain (a LoRA trained on a LoRA-merged parent) is pre-combined once at load by concatenating
ranks (``A = [A1 A2]``, ``B = [s1*B1; s2*B2]``), which is the exact sum of the deltas, with no merge rounding.

Orientation: PEFT keeps ``lora_A.weight`` as ``[r, in]`` and ``lora_B.weight`` as ``[out, r]`` (also on GPT-2's
``Conv1D``, where ``fan_in_fan_out=True`` only changes merging) and computes ``lora_B(lora_A(x)) * alpha / r``;
the bank stores ``A.T`` (``[in, r]``) and ``scale * B.T`` (``[r, out]``). A projection that is a column slice of
a fused decoder linear (Llama's k_proj inside ``attn.qkv``) gets a B that is zero outside its slice; the deltas
of several projections of one linear are concatenated along the rank, so B is block-diagonal and the sum exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import StemmaError
from ..models.families.serving import DecoderShape, LoraSite

FUSED_COLUMNS = 128
"""While every block linear's share of the adapter bank is at most this many rank columns (e.g. 8 adapters of
rank 16), the bank's A matrices are extra columns of each block weight (`Decoder._sync_fused`): a mixed batch
computes every row's ``x @ A`` of every loaded adapter in the base GEMM itself, which costs next to nothing there,
instead of a separate small GEMM per linear that runs far below the machine's peak."""
CONCAT_COLUMNS = 128
"""Otherwise decode applies the batch's adapters concatenated while they hold at most this many rank columns
in all; beyond it, grouped batched matmuls (SGMV) waste less."""


@dataclass
class LoraDelta:
    """One servable adapter (possibly a pre-combined chain): per decoder linear, ``A.T`` and ``scale * B.T``."""

    a: dict[tuple[int, str], torch.Tensor]
    """(layer, linear) -> [in, r]."""
    b: dict[tuple[int, str], torch.Tensor]
    """(layer, linear) -> [r, out], the scaling folded in."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.a.values()) + list(self.b.values()))

    def rank(self) -> int:
        return max((t.shape[1] for t in self.a.values()), default=0)

    def ranks(self) -> dict[str, int]:
        """Rank per decoder linear (the largest over layers)."""
        out: dict[str, int] = {}
        for (_, name), t in self.a.items():
            out[name] = max(out.get(name, 0), t.shape[1])
        return out

    @staticmethod
    def concat(deltas: list[LoraDelta]) -> LoraDelta:
        """The exact sum of several deltas as one delta of the summed rank (an adapter chain)."""
        keys = sorted({k for d in deltas for k in d.a})
        a, b = {}, {}
        for k in keys:
            parts = [(d.a[k], d.b[k]) for d in deltas if k in d.a]
            a[k] = torch.cat([p[0] for p in parts], dim=1)
            b[k] = torch.cat([p[1] for p in parts], dim=0)
        return LoraDelta(a=a, b=b)


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
    parts: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor]]] = {}
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
        d_in, d_out = shape.linear_dims(where.linear)
        if tuple(t.shape) != (r, d_in) or tuple(lb.shape) != (where.width, r):
            raise StemmaError(f"LoRA tensor shapes {tuple(t.shape)}/{tuple(lb.shape)} do not fit {prefix} "
                              f"({d_in}->{where.width}, r={r})")
        b = (lb.float() * scale).t()  # [r, width]
        if where.width != d_out:  # a slice of a fused linear: zero outside its columns
            b = torch.zeros(r, d_out).index_copy_(1, torch.arange(where.column, where.column + where.width), b)
        parts.setdefault((where.layer, where.linear), []).append((where.column, t.float().t().contiguous(),
                                                                   b.contiguous()))
    a, b = {}, {}
    for k, ps in parts.items():
        ps.sort(key=lambda p: p[0])
        a[k] = ps[0][1] if len(ps) == 1 else torch.cat([p[1] for p in ps], dim=1)  # [in, r * projections]
        b[k] = ps[0][2] if len(ps) == 1 else torch.cat([p[2] for p in ps], dim=0)  # block-diagonal [r * ..., out]
    return LoraDelta(a=a, b=b)


class LoraBank:
    """Stacked adapters of one base: per block linear, ``A [slots, in, R]`` and ``B [slots, R, out]``.

    Slot 0 is the zero adapter. R is per decoder linear (a Llama adapter on q, k and v has three times the rank
    of its ``attn.out`` part in the fused ``attn.qkv``); adapters of smaller rank are zero-padded to it (a zero
    column of A and row of B add nothing), and a linear no adapter touches holds nothing. The bank grows by whole
    slots when full; freed slots are reused.
    """

    def __init__(self, shape: DecoderShape):
        self.shape = shape
        self.rank: dict[str, int] = {}
        """Decoder linear -> R."""
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        self.n_slots = 1  # the zero adapter
        self.free: list[int] = []
        self.version = 0
        """Bumped on every change, so cached gathers of the bank's weights are never stale."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.a.values()) + list(self.b.values()))

    def _resize(self, n_slots: int, rank: dict[str, int]) -> None:
        for name, r in rank.items():
            d_in, d_out = self.shape.linear_dims(name)
            for layer in range(self.shape.n_layer):
                k = (layer, name)
                a = torch.zeros(n_slots, d_in, r)
                b = torch.zeros(n_slots, r, d_out)
                if k in self.a:
                    old_a, old_b = self.a[k], self.b[k]
                    a[: old_a.shape[0], :, : old_a.shape[2]] = old_a
                    b[: old_b.shape[0], : old_b.shape[1]] = old_b
                self.a[k], self.b[k] = a, b
        self.n_slots, self.rank = n_slots, rank

    def add(self, delta: LoraDelta) -> int:
        """Store an adapter; returns its slot."""
        self.version += 1
        ranks = delta.ranks()
        grown = {n: max(self.rank.get(n, 0), ranks.get(n, 0)) for n in self.shape.linear_names
                 if n in self.rank or n in ranks}
        if self.free:
            slot = self.free.pop()
            if grown != self.rank:
                self._resize(self.n_slots, grown)
        else:
            slot = self.n_slots
            self._resize(self.n_slots + 1, grown)
        for k in self.a:
            self.a[k][slot].zero_()
            self.b[k][slot].zero_()
        for k, ta in delta.a.items():
            self.a[k][slot, :, : ta.shape[1]] = ta
            self.b[k][slot, : ta.shape[1]] = delta.b[k]
        return slot

    def remove(self, slot: int) -> None:
        self.version += 1
        for k in self.a:
            self.a[k][slot].zero_()
            self.b[k][slot].zero_()
        self.free.append(slot)


@dataclass
class LoraPlan:
    """How a batch's rows map to adapters, worked out once per batch composition.

    Rows are grouped by adapter and each group padded to the largest group's size ``L``, so every adapted
    linear is two batched matmuls over the ``G`` adapters present (``[G, L*T, in] @ [G, in, R] @ [G, R, out]``):
    each adapter's weights are read once per step, not copied per row, and the op count does not grow with
    the number of adapters. The gathered per-group weights are kept here and reused while the batch is unchanged.
    """

    uniform: int | None = None
    """The one adapter slot every row uses, if they all use the same one."""
    idx: torch.Tensor | None = None
    """[G*L] batch row of each padded position (padding points at a real row; its result is masked out)."""
    mask: torch.Tensor | None = None
    """[G*L, 1, 1] 1 for real positions, 0 for padding; None when no group needed padding."""
    slots: torch.Tensor | None = None
    """[G] adapter slot of each group."""
    groups: int = 0
    width: int = 0
    """L: rows per group after padding."""
    weights: dict = field(default_factory=dict)
    """(layer, linear) -> (A [G, in, R], B [G, R, out]); (layer, linear, "concat") -> (A [in, G*R],
    B [G*R, out]); filled on first use."""
    aids: torch.Tensor | None = None
    """[B] adapter slot per row (prefill gathers per row)."""
    row_groups: torch.Tensor | None = None
    """[B] group of each row (-1: no adapter), for the concatenated form."""
    colmasks: dict = field(default_factory=dict)
    """Cached `colmask` / `slotmask` results."""

    @staticmethod
    def of(aids: torch.Tensor) -> LoraPlan | None:
        """None when no row has an adapter (the LoRA path is skipped entirely)."""
        first = int(aids[0])
        if bool((aids == first).all()):
            return None if first == 0 else LoraPlan(uniform=first)
        rows = torch.nonzero(aids, as_tuple=True)[0]
        slots, counts = torch.unique(aids[rows], return_counts=True)
        G, L = len(slots), int(counts.max())
        idx = torch.zeros(G, L, dtype=torch.long)
        mask = torch.zeros(G, L)
        row_groups = torch.full_like(aids, -1)  # for the concatenated form
        for g, slot in enumerate(slots.tolist()):
            members = rows[aids[rows] == slot]
            row_groups[members] = g
            idx[g, : len(members)] = members
            idx[g, len(members) :] = members[0]
            mask[g, : len(members)] = 1
        padded = bool((mask == 0).any())
        return LoraPlan(idx=idx.view(-1), mask=mask.view(-1, 1, 1) if padded else None, slots=slots, groups=G,
                        width=L, aids=aids, row_groups=row_groups)

    def slotmask(self, cols: int, rank: int) -> torch.Tensor:
        """[B, cols] 1 where a column of the bank's stacked adapters (slot s: columns (s-1)*rank .. s*rank)
        belongs to the row's adapter."""
        return self._mask(("slots", cols, rank), torch.arange(cols) // rank + 1, self.aids)

    def colmask(self, rank: int) -> torch.Tensor:
        """[B, G*R] 1 where a column of the batch's concatenated adapters belongs to the row's group."""
        return self._mask(("groups", rank), torch.arange(self.groups * rank) // rank, self.row_groups)

    def _mask(self, key: tuple, column_owner: torch.Tensor, row_owner: torch.Tensor) -> torch.Tensor:
        m = self.colmasks.get(key)
        if m is None:
            m = self.colmasks[key] = (column_owner[None, :] == row_owner[:, None]).float()
        return m
