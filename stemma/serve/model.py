"""A batched GPT-2 decoder for serving, written against the Hugging Face weights (nanoGPT style).

Training uses transformers' ``GPT2LMHeadModel``; serving runs this smaller re-implementation because it
needs three things ``generate`` does not give: a KV cache preallocated per *slot* (a request occupies a
slot from prefill to its last token, and requests join and leave between decode steps), rows at
different positions in one decode step, and a different LoRA adapter per row.

Per-row LoRA follows S-LoRA / Punica (Sheng et al., 2023; Chen et al., 2023): every loaded adapter's
A and B matrices are stacked in a `LoraBank`; a `LoraPlan` groups the batch's rows by adapter (SGMV) and
adds ``(x @ A[id]) @ B[id]`` to the base output ``x @ W + b`` of every row in two batched matmuls.
Slot 0 is no adapter, so base-model rows ride in the same batch and skip the LoRA work. While the bank is
small, the A matrices of all loaded adapters are extra columns of the base weights, so for a mixed batch one
GEMM gives ``x @ W`` and every ``x @ A``; each row keeps its own adapter's columns and one more GEMM adds
``@ B``. A chain (a LoRA trained on a LoRA-merged parent) is pre-combined once at load by concatenating
ranks (``A = [A1 A2]``, ``B = [s1*B1; s2*B2]``), which is the exact sum of the deltas, with no merge
rounding.

Orientation: GPT-2's ``Conv1D`` stores weights as ``[in, out]`` (``y = x @ W + b``). PEFT's LoRA on it
(``fan_in_fan_out=True``) keeps ``lora_A.weight`` as ``[r, in]`` and ``lora_B.weight`` as ``[out, r]`` and
computes ``lora_B(lora_A(x)) * alpha / r``; the bank stores ``A.T`` (``[in, r]``) and ``scale * B.T``
(``[r, out]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import StemmaError

# Linear layers of a GPT-2 block, by their name inside the block ("attn.c_proj" and "mlp.c_proj" differ).
BLOCK_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
FUSED_COLUMNS = 128
"""While the adapter bank holds at most this many rank columns in all (e.g. 8 adapters of rank 16), its A
matrices are extra columns of each block weight (`Decoder._sync_fused`): a mixed batch computes every row's
``x @ A`` of every loaded adapter in the base GEMM itself, which costs next to nothing there, instead of a
separate small GEMM per linear that runs far below the machine's peak."""
CONCAT_COLUMNS = 128
"""Otherwise decode applies the batch's adapters concatenated while they hold at most this many rank columns
in all; beyond it, grouped batched matmuls (SGMV) waste less."""


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
"""Rows oneDNN is told to expect when it chooses the packed layout (any row count works). Inputs of more rows
are padded to a multiple of it: oneDNN builds a kernel per input shape (0.3-0.6 ms, measured) and caches 1024,
so prefill shapes (rows x prompt length) would otherwise keep building new ones."""


class Linear:
    """One linear layer, ``y = x @ W + b`` with W [in, n] (GPT-2's Conv1D orientation), its weight packed by
    oneDNN when `PACKED` (else kept as a plain contiguous tensor for ``addmm``).

    A block linear may carry extra columns after its first ``out`` (the fused adapters' A's, see
    `Decoder._sync_fused`); callers slice them off.
    """

    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        self.d_in, self.n = w.shape
        self.bias = bias
        self.packed = PACKED
        if self.packed:  # oneDNN takes nn.Linear's [out, in]
            self.w = torch.ops.mkldnn._reorder_linear_weight(w.t().contiguous(), PACK_ROWS)
        else:
            self.w = w.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """[M, in] -> [M, n]."""
        if self.packed:
            m = x.shape[0]
            pad = -m % PACK_ROWS if m > PACK_ROWS else 0
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


@dataclass(frozen=True)
class DecoderShape:
    """Shape of a GPT-2 decoder, read from its Hugging Face config."""

    n_layer: int
    """Transformer blocks."""
    n_head: int
    """Attention heads."""
    n_embd: int
    """Hidden width."""
    context: int
    """Maximum sequence length (position embeddings)."""
    vocab_size: int
    """Rows of the token embedding (and of the tied output head)."""
    eps: float
    """LayerNorm epsilon."""
    n_inner: int = 0
    """MLP width (0: 4 * n_embd, GPT-2's default)."""

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def linear_dims(self, name: str) -> tuple[int, int]:
        """(in, out) of a block linear."""
        d, f = self.n_embd, self.n_inner or 4 * self.n_embd
        dims = {"attn.c_attn": (d, 3 * d), "attn.c_proj": (d, d), "mlp.c_fc": (d, f), "mlp.c_proj": (f, d)}
        return dims[name]

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs of one token attending to ``context`` keys (2 per multiply-add, LoRA excluded)."""
        linears = sum(math.prod(self.linear_dims(n)) for n in BLOCK_LINEARS) * self.n_layer
        attention = 2 * self.n_layer * self.n_embd * context  # q.k and p.v
        return 2.0 * (linears + self.vocab_size * self.n_embd + attention)


def shape_of(hf_config) -> DecoderShape:
    """The decoder shape of a transformers config, refusing what this decoder does not implement."""
    c = hf_config
    if c.model_type != "gpt2":
        raise StemmaError(f"serving supports GPT-2 models only, not {c.model_type!r}")
    if c.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise StemmaError(f"serving supports GPT-2 with gelu_new only, not {c.activation_function!r}")
    if getattr(c, "scale_attn_by_inverse_layer_idx", False) or getattr(c, "reorder_and_upcast_attn", False):
        raise StemmaError("serving does not support scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
    if not getattr(c, "scale_attn_weights", True):
        raise StemmaError("serving supports GPT-2 with scaled attention only")
    return DecoderShape(n_layer=c.n_layer, n_head=c.n_head, n_embd=c.n_embd, context=c.n_positions,
                        vocab_size=c.vocab_size, eps=c.layer_norm_epsilon, n_inner=c.n_inner or 0)


@dataclass
class LoraDelta:
    """One servable adapter (possibly a pre-combined chain): per block linear, ``A.T`` and ``scale * B.T``."""

    a: dict[tuple[int, str], torch.Tensor]
    """(layer, linear) -> [in, r]."""
    b: dict[tuple[int, str], torch.Tensor]
    """(layer, linear) -> [r, out], the scaling folded in."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.a.values()) + list(self.b.values()))

    def rank(self) -> int:
        return max((t.shape[1] for t in self.a.values()), default=0)

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


def lora_from_peft(tensors: dict[str, torch.Tensor], adapter_config: dict, shape: DecoderShape) -> LoraDelta:
    """Convert PEFT ``adapter_model.safetensors`` tensors of a GPT-2 LoRA into a `LoraDelta`."""
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
    a, b = {}, {}
    for key, t in tensors.items():
        # base_model.model.transformer.h.0.attn.c_attn.lora_A.weight
        if ".lora_A." not in key:
            if ".lora_B." in key:
                continue
            raise StemmaError(f"unexpected tensor {key!r} in a LoRA adapter (only lora_A/lora_B are served)")
        prefix = key.split(".lora_A.")[0]
        parts = prefix.split(".")
        try:
            i = parts.index("h")
            layer, name = int(parts[i + 1]), ".".join(parts[i + 2 :])
        except (ValueError, IndexError):
            raise StemmaError(f"LoRA tensor {key!r} does not target a GPT-2 block linear") from None
        if name not in BLOCK_LINEARS or not 0 <= layer < shape.n_layer:
            raise StemmaError(f"LoRA tensor {key!r} does not target a GPT-2 block linear")
        lb = tensors.get(prefix + ".lora_B.weight")
        if lb is None:
            raise StemmaError(f"LoRA adapter has {key} but no matching lora_B")
        d_in, d_out = shape.linear_dims(name)
        if tuple(t.shape) != (r, d_in) or tuple(lb.shape) != (d_out, r):
            raise StemmaError(f"LoRA tensor shapes {tuple(t.shape)}/{tuple(lb.shape)} do not fit {name} "
                              f"({d_in}->{d_out}, r={r})")
        a[(layer, name)] = t.float().t().contiguous()  # [in, r]
        b[(layer, name)] = (lb.float() * scale).t().contiguous()  # [r, out]
    return LoraDelta(a=a, b=b)


class LoraBank:
    """Stacked adapters of one base: per block linear, ``A [slots, in, R]`` and ``B [slots, R, out]``.

    Slot 0 is the zero adapter. Adapters of smaller rank are zero-padded to the bank's rank R (a zero
    column of A and row of B add nothing). The bank grows by whole slots when full; freed slots are reused.
    """

    def __init__(self, shape: DecoderShape):
        self.shape = shape
        self.rank = 0
        self.a: dict[tuple[int, str], torch.Tensor] = {}
        self.b: dict[tuple[int, str], torch.Tensor] = {}
        self.n_slots = 1  # the zero adapter
        self.free: list[int] = []
        self.version = 0
        """Bumped on every change, so cached gathers of the bank's weights are never stale."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in list(self.a.values()) + list(self.b.values()))

    def _resize(self, n_slots: int, rank: int) -> None:
        for layer in range(self.shape.n_layer):
            for name in BLOCK_LINEARS:
                k = (layer, name)
                d_in, d_out = self.shape.linear_dims(name)
                a = torch.zeros(n_slots, d_in, rank)
                b = torch.zeros(n_slots, rank, d_out)
                if k in self.a:
                    old_a, old_b = self.a[k], self.b[k]
                    a[: old_a.shape[0], :, : old_a.shape[2]] = old_a
                    b[: old_b.shape[0], : old_b.shape[1]] = old_b
                self.a[k], self.b[k] = a, b
        self.n_slots, self.rank = n_slots, rank

    def add(self, delta: LoraDelta) -> int:
        """Store an adapter; returns its slot."""
        self.version += 1
        r = delta.rank()
        if self.free:
            slot = self.free.pop()
            if r > self.rank:
                self._resize(self.n_slots, r)
        else:
            slot = self.n_slots
            self._resize(self.n_slots + 1, max(r, self.rank))
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


class Decoder:
    """GPT-2 forward over a slot KV cache with per-row LoRA.

    Args:
        state: the Hugging Face ``GPT2LMHeadModel`` state dict (tensors are used as they are, not copied).
        shape: its shape.
        max_slots: rows of the KV cache, i.e. the largest batch.
    """

    def __init__(self, state: dict[str, torch.Tensor], shape: DecoderShape, max_slots: int):
        self.shape = shape
        p = {k.removeprefix("transformer."): v.detach().float() for k, v in state.items()}
        self.wte, self.wpe = p["wte.weight"], p["wpe.weight"]  # [V, C], [ctx, C]
        self.lm_head = Linear(p.get("lm_head.weight", self.wte).t(), None)  # [C, V]: its own copy, packed or not
        self.ln_f = (p["ln_f.weight"], p["ln_f.bias"])
        self.blocks = []
        for i in range(shape.n_layer):
            g = lambda n, i=i: p[f"h.{i}.{n}"]  # noqa: E731
            self.blocks.append({
                "ln_1": (g("ln_1.weight"), g("ln_1.bias")), "ln_2": (g("ln_2.weight"), g("ln_2.bias")),
                **{name: Linear(g(f"{name}.weight"), g(f"{name}.bias")) for name in BLOCK_LINEARS},  # W [in, out]
            })
        H, D = shape.n_head, shape.head_dim
        self.max_slots = max_slots
        # One K and one V cache per layer: [slot, head, position, head_dim].
        self.k_cache = [torch.zeros(max_slots, H, shape.context, D) for _ in range(shape.n_layer)]
        self.v_cache = [torch.zeros(max_slots, H, shape.context, D) for _ in range(shape.n_layer)]
        self.bank = LoraBank(shape)
        self._plan: tuple[tuple, LoraPlan | None] | None = None  # (key, plan) of the last batch composition
        self._fused_key: tuple[int, int] = (0, -1)
        """(rank columns the block linears carry after their ``out``, bank version they were built from)."""

    def _sync_fused(self) -> None:
        """Bring the block linears' extra columns up to date with the bank (none: fused form off).

        Adapter slot ``s`` (>= 1) occupies extra columns ``(s-1)*R .. s*R``, R being the bank's rank. A bank
        change rebuilds (and repacks) every block linear once, at the next mixed batch; a bank wider than
        FUSED_COLUMNS drops the extra columns.
        """
        bank = self.bank
        cols = (bank.n_slots - 1) * bank.rank
        cols = cols if 0 < cols <= FUSED_COLUMNS else 0
        key = (cols, bank.version if cols else -1)
        if key == self._fused_key:
            return
        for layer, blk in enumerate(self.blocks):
            for name in BLOCK_LINEARS:
                d_in, d_out = self.shape.linear_dims(name)
                lin = blk[name]
                w, bias = lin.dense()[:, :d_out], lin.bias[:d_out]
                if cols:
                    a = bank.a[(layer, name)][1:]  # [slots-1, in, R]
                    w = torch.cat([w, a.permute(1, 0, 2).reshape(d_in, cols)], dim=1)
                    bias = torch.cat([bias, bias.new_zeros(cols)])
                blk[name] = Linear(w, bias)
        self._fused_key = key

    def plan(self, aids: torch.Tensor) -> LoraPlan | None:
        """The LoRA plan of a batch, reused while neither the rows' adapters nor the bank change; a batch mixing
        adapters first brings the fused weights up to date."""
        key = (self.bank.version, tuple(aids.tolist()))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, LoraPlan.of(aids))
        plan = self._plan[1]
        if plan is not None and plan.uniform is None:
            self._sync_fused()
        return plan

    @property
    def nbytes(self) -> int:
        """Bytes held by weights, KV cache and adapter bank (tied weights counted once)."""
        seen, total = set(), 0
        tensors = [self.wte, self.wpe, *self.ln_f, *self.k_cache, *self.v_cache]
        linears = [self.lm_head]
        for blk in self.blocks:
            for v in blk.values():
                if isinstance(v, Linear):
                    linears.append(v)
                else:
                    tensors.extend(v)
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total + sum(lin.nbytes for lin in linears) + self.bank.nbytes

    # ------------------------------------------------------------------ pieces
    def _linear(self, x: torch.Tensor, layer: int, name: str, plan: LoraPlan | None) -> torch.Tensor:
        """``x @ W + b`` plus each row's LoRA delta. x: [B, T, in] -> [B, T, out]."""
        B, T, d_in = x.shape
        d_out = self.shape.linear_dims(name)[1]
        full = self.blocks[layer][name](x.reshape(-1, d_in))  # [B*T, out (+ the fused adapters' columns)]
        y2 = full[:, :d_out]
        y = y2.view(B, T, d_out)
        if plan is None or (layer, name) not in self.bank.a:
            return y
        cols = self._fused_key[0]
        if cols and plan.uniform is None:
            # A mixed batch over a small bank: the base GEMM also gave [x @ A_1 | ... | x @ A_S]; each row keeps its
            # own adapter's columns (the others zeroed) and one GEMM against the stacked B's adds the deltas.
            t = full[:, d_out:]
            t.view(B, T, cols).mul_(plan.slotmask(cols, self.bank.rank)[:, None, :])
            y2.addmm_(t, self.bank.b[(layer, name)][1:].reshape(cols, d_out))
            return y
        a, b = self.bank.a[(layer, name)], self.bank.b[(layer, name)]
        if plan.uniform is not None:  # every row uses the same adapter: two plain matmuls
            return y.add_((x @ a[plan.uniform]) @ b[plan.uniform])
        if x.shape[1] > 1:
            # Prefill (T > 1): per-row gathered A and B (Punica's BGMV). The weight copies ([B, in, R]) are small
            # next to the activations, which grouping would have to copy and scatter back.
            return y.add_(torch.bmm(torch.bmm(x, a[plan.aids]), b[plan.aids]))
        R = a.shape[2]
        if plan.groups * R <= CONCAT_COLUMNS:
            # Decode, few adapters: the batch's adapters concatenated ([in, G*R], [G*R, out]) and two plain
            # GEMMs over all rows, each row keeping only its own adapter's columns. No gather or scatter of
            # rows; the extra multiply-adds (G*R columns for every row) are cheap next to the base GEMM.
            ab = plan.weights.get((layer, name, "concat"))
            if ab is None:
                sel_a, sel_b = a[plan.slots], b[plan.slots]  # [G, in, R], [G, R, out]
                ab = (sel_a.permute(1, 0, 2).reshape(d_in, -1).contiguous(), sel_b.reshape(-1, sel_b.shape[2]))
                plan.weights[(layer, name, "concat")] = ab
            t = (x.reshape(-1, d_in) @ ab[0]).mul_(plan.colmask(R))  # [B*T, G*R] (T = 1 in decode)
            y2.addmm_(t, ab[1])
            return y
        # Decode, many adapters: Punica's SGMV, padded: rows grouped by adapter, one batched matmul pair over
        # the groups.
        ab = plan.weights.get((layer, name))
        if ab is None:
            ab = plan.weights[(layer, name)] = (a[plan.slots], b[plan.slots])  # [G, in, R], [G, R, out]
        G, L = plan.groups, plan.width
        xs = x.index_select(0, plan.idx).view(G, L * T, d_in)  # [G, L*T, in]
        d = torch.bmm(torch.bmm(xs, ab[0]), ab[1]).view(G * L, T, -1)  # [G*L, T, out]
        if plan.mask is not None:
            d.mul_(plan.mask)  # padding rows repeat a real row; they must add nothing
        return y.index_add_(0, plan.idx, d)

    def _attention_inputs(self, x, layer, plan):
        B, T, C = x.shape
        H, D = self.shape.n_head, self.shape.head_dim
        qkv = self._linear(x, layer, "attn.c_attn", plan)  # [B, T, 3C]
        q, k, v = qkv.split(C, dim=2)
        # [B, T, C] -> [B, H, T, D]
        return (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))

    def _mlp_and_out(self, x, y, layer, plan):
        """Residual after attention output ``y`` [B, T, C], then the MLP block."""
        blk = self.blocks[layer]
        B, T, C = x.shape
        y = y.transpose(1, 2).reshape(B, T, C)  # [B, H, T, D] -> [B, T, C]
        x = x + self._linear(y, layer, "attn.c_proj", plan)
        h = F.layer_norm(x, (C,), *blk["ln_2"], eps=self.shape.eps)
        h = F.gelu(self._linear(h, layer, "mlp.c_fc", plan), approximate="tanh")  # [B, T, 4C]
        return x + self._linear(h, layer, "mlp.c_proj", plan)

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slot0: int, aids: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts into cache slots ``slot0 .. slot0+B-1``; returns next-token logits [B, V].

        Right padding is exact under a causal mask: a real token at position t only sees positions <= t,
        which are all real. The padded tail writes junk K/V past each prompt; decode overwrites position
        ``length`` first and never attends past a row's own position.

        Args:
            tokens: [B, T] token ids, row i real up to ``lengths[i]``.
            lengths: [B] prompt lengths (>= 1).
            slot0: first cache slot to fill.
            aids: [B] adapter slot per row (0: none).
        """
        B, T = tokens.shape
        C = self.shape.n_embd
        plan = self.plan(aids)
        x = self.wte[tokens] + self.wpe[:T]  # [B, T, C]
        for layer, blk in enumerate(self.blocks):
            h = F.layer_norm(x, (C,), *blk["ln_1"], eps=self.shape.eps)
            q, k, v = self._attention_inputs(h, layer, plan)  # [B, H, T, D] each
            self.k_cache[layer][slot0 : slot0 + B, :, :T] = k
            self.v_cache[layer][slot0 : slot0 + B, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
            x = self._mlp_and_out(x, y, layer, plan)
        last = x[torch.arange(B), lengths - 1]  # [B, C]: each row's last real position
        return self._logits(last)

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, aids: torch.Tensor) -> torch.Tensor:
        """One token for each of the first B slots; returns next-token logits [B, V].

        Args:
            tokens: [B] the token each slot feeds in now.
            positions: [B] its position (= tokens already in the slot's cache).
            aids: [B] adapter slot per row.
        """
        B = tokens.shape[0]
        C = self.shape.n_embd
        plan = self.plan(aids)
        L = int(positions.max()) + 1  # keys to look at: up to the furthest row
        H, D = self.shape.n_head, self.shape.head_dim
        # Where each row's new K/V go in a layer's cache seen as [slot * head * position, head_dim]: one
        # index_copy_ (advanced-index assignment on the 4-d cache took several times longer).
        dst = ((torch.arange(B)[:, None] * H + torch.arange(H)[None, :]) * self.shape.context
               + positions[:, None]).view(-1)
        visible = (torch.arange(L)[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, L]
        bias = torch.zeros(B, 1, 1, L).masked_fill_(~visible, float("-inf"))
        scale = self.shape.head_dim ** -0.5
        x = (self.wte[tokens] + self.wpe[positions])[:, None, :]  # [B, 1, C]
        for layer, blk in enumerate(self.blocks):
            h = F.layer_norm(x, (C,), *blk["ln_1"], eps=self.shape.eps)
            q, k, v = self._attention_inputs(h, layer, plan)  # [B, H, 1, D]
            kc, vc = self.k_cache[layer], self.v_cache[layer]
            kc.view(-1, D).index_copy_(0, dst, k.reshape(B * H, D))
            vc.view(-1, D).index_copy_(0, dst, v.reshape(B * H, D))
            # One query per row: two batched matmuls and a softmax beat PyTorch's CPU flash-attention kernel
            # here (about 3x per call at 64 rows), whose blocking is made for long queries.
            scores = torch.matmul(q, kc[:B, :, :L].transpose(-1, -2)).mul_(scale).add_(bias)  # [B, H, 1, L]
            y = torch.matmul(torch.softmax(scores, dim=-1), vc[:B, :, :L])  # [B, H, 1, D]
            x = self._mlp_and_out(x, y, layer, plan)
        return self._logits(x[:, 0])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(h, (self.shape.n_embd,), *self.ln_f, eps=self.shape.eps)
        return self.lm_head(h)  # [B, V]

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a slot's cache (its first ``length`` positions) to another slot (compaction)."""
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]
