"""A batched decoder-only transformer for serving, one forward for every family (nanoGPT style).

Training uses transformers' models; serving runs this smaller re-implementation because it needs three things
``generate`` does not give: a KV cache preallocated per *slot* (a request occupies a slot from prefill to its
last token, and requests join and leave between decode steps), rows at different positions in one decode step,
and a different LoRA adapter per row (`stemma.serve.lora`).

It runs from a family's `DecoderShape` and `DecoderWeights` (`stemma.models.families.serving`) alone: GPT-2
(LayerNorm, learned positions, GELU) and the Llama layout (RMSNorm, RoPE, SwiGLU, grouped-query attention) are
the same block with different norms, positions and activation::

    x = embed(tokens) (+ position_table[positions])
    for each block:
        q, k, v = split(norm_1(x) @ W_qkv)          (RoPE on q and k)
        x = x + attention(q, k, v) @ W_out           (causal; K/V into the slot cache)
        x = x + down(act(norm_2(x) @ W_up))          (act: gelu, or silu(gate) * up)
    logits = norm(x) @ W_head
"""

from __future__ import annotations

import ctypes
import functools
import sys

import torch
import torch.nn.functional as F

from ..models.families.serving import ATTN_OUT, LINEARS, MLP_DOWN, MLP_UP, QKV, DecoderShape, DecoderWeights, Norm
from . import kernels, lora
from .linear import Linear
from .lora import LoraBank, LoraPlan


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE in transformers' convention (dimension i of a head pairs with i + head_dim/2):
    ``x * cos + rotate_half(x) * sin``, where ``rotate_half(x) = [-x2, x1]`` is the halves swapped times the sign
    folded into ``sin_signed``. Three operations over the queries and keys together, where applying it to each as
    written takes five apiece: at decode's small shapes the per-operation cost is what shows."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return (x * cos).addcmul_(swapped, sin_signed)


class Decoder:
    """Decoder forward over a slot KV cache with per-row LoRA.

    The decoder keeps copies of its own of every weight (packed ones are copies anyway): no tensor of the model
    stays referenced, so the model can be freed once the decoder is built, and with it the file mapping its
    weights may live in (a safetensors checkpoint loaded without a copy is mapped whole, and one kept view of it
    keeps every page of the file that was read resident). The KV cache is allocated at the first batch, after the
    caller has let the model go, so loading never holds the model, the packed weights and the cache at once.

    Args:
        weights: the model's weights.
        shape: its shape.
        max_slots: rows of the KV cache, i.e. the largest batch.
    """

    def __init__(self, weights: DecoderWeights, shape: DecoderShape, max_slots: int):
        self.shape = shape
        self.embedding = _own(weights.embedding)  # [V, C]
        self.position_table = _own(weights.position_table)  # [ctx, C] or None
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None
        if shape.positions == "rope":
            # cos and sin of every position, computed as transformers does (fp32 angle = position * inv_freq, each
            # frequency for dimensions i and i + head_dim/2, times attention_scaling), so each row looks its own
            # position up.
            freqs = torch.arange(shape.context, dtype=torch.float32)[:, None] * weights.inv_freq.float()[None, :]
            angles = torch.cat((freqs, freqs), dim=-1)  # [ctx, D]
            sign = torch.ones(shape.head_dim)
            sign[: shape.head_dim // 2] = -1.0  # rotate_half's sign, see `_rope`
            self.rope = (angles.cos() * weights.attention_scaling, angles.sin() * weights.attention_scaling * sign)
        self.norms = [(_own_norm(b.norm_1), _own_norm(b.norm_2)) for b in weights.blocks]
        self.linears = [{n: Linear(b.linears[n].w, _own(b.linears[n].bias)) for n in LINEARS} for b in weights.blocks]
        self.norm_f = _own_norm(weights.norm)
        self.lm_head = Linear(weights.head, None)  # [C, V]: its own copy, packed or not
        self.max_slots = max_slots
        self.k_cache: list[torch.Tensor] = []
        """Per layer [slot, kv head, position, head_dim]; allocated by `_cache` at the first batch."""
        self.v_cache: list[torch.Tensor] = []
        self.bank = LoraBank(shape)
        self._plan: tuple[tuple, LoraPlan | None] | None = None  # (key, plan) of the last batch composition
        self._fused: dict[str, int] = {}
        """Rank columns each block linear carries after its ``out`` (empty: fused form off)."""
        self._fused_version = -1
        """Bank version the fused columns were built from."""

    def _sync_fused(self) -> None:
        """Bring the block linears' extra columns up to date with the bank (none: fused form off).

        Adapter slot ``s`` (>= 1) occupies extra columns ``(s-1)*R .. s*R`` of a linear, R being the bank's rank
        for it. A bank change rebuilds (and repacks) the adapted block linears once, at the next mixed batch; a
        bank with more than FUSED_COLUMNS columns for some linear drops the extra columns. While the fused columns
        are current they are the only copy of the bank's A's (``bank.a`` holds None for those linears): every
        batch reads its rows' ``x @ A`` from the fused GEMM's output, and `_restore_a` brings the A's back before
        the bank changes.
        """
        bank = self.bank
        cols = {n: (bank.n_slots - 1) * r for n, r in bank.rank.items() if r}
        if not 0 < max(cols.values(), default=0) <= lora.FUSED_COLUMNS:
            cols = {}
        version = bank.version if cols else -1
        if (cols, version) == (self._fused, self._fused_version):
            return
        self._restore_a()
        for layer, lins in enumerate(self.linears):
            for name in LINEARS:
                d_in, d_out = self.shape.linear_dims(name)
                lin, extra = lins[name], cols.get(name, 0)
                if lin.n == d_out and not extra:
                    continue
                w = lin.dense()[:, :d_out]
                bias = None if lin.bias is None else lin.bias[:d_out]
                if extra:
                    w = torch.cat([w, bank.a[(layer, name)].reshape(d_in, extra)], dim=1)  # A: [in, slots-1, R]
                    bias = None if bias is None else torch.cat([bias, bias.new_zeros(extra)])
                lins[name] = Linear(w, bias)
                del w
                if extra:
                    bank.a[(layer, name)] = None  # its one copy is now the fused weight's columns
        self._fused, self._fused_version = cols, version
        release_free_memory()

    def _restore_a(self) -> None:
        """Copy the bank's A's back out of the fused columns (before the bank changes or the columns go)."""
        for (layer, name), a in self.bank.a.items():
            if a is None:
                d_in, d_out = self.shape.linear_dims(name)
                cols, R = self._fused[name], self.bank.rank[name]
                dense = self.linears[layer][name].dense()  # [in, out + cols]
                self.bank.a[(layer, name)] = dense[:, d_out : d_out + cols].reshape(d_in, cols // R, R).clone()
                del dense

    def add_adapter(self, delta) -> int:
        """Store an adapter in the bank; returns its slot."""
        self._restore_a()
        return self.bank.add(delta)

    def remove_adapter(self, slot: int) -> None:
        self._restore_a()
        self.bank.remove(slot)

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
        seen, total = set(), self.cache_bytes
        tensors = [self.embedding, *(self.rope or ())]
        if self.position_table is not None:
            tensors.append(self.position_table)
        for norm in [self.norm_f, *(n for pair in self.norms for n in pair)]:
            tensors.extend(t for t in (norm.weight, norm.bias) if t is not None)
        linears = [self.lm_head, *(lin for lins in self.linears for lin in lins.values())]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total + sum(lin.nbytes for lin in linears) + self.bank.nbytes

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV cache (counted before it is allocated)."""
        sh = self.shape
        return 2 * sh.n_layer * self.max_slots * sh.n_kv_head * sh.context * sh.head_dim * 4

    def _cache(self) -> None:
        """Allocate the KV cache, one K and one V per layer, zeroed (masked positions must hold finite values)."""
        if not self.k_cache:
            cache = (self.max_slots, self.shape.n_kv_head, self.shape.context, self.shape.head_dim)
            with torch.inference_mode(False):  # plain tensors: `move_slot` writes them outside inference mode
                self.k_cache = [torch.zeros(cache) for _ in range(self.shape.n_layer)]
                self.v_cache = [torch.zeros(cache) for _ in range(self.shape.n_layer)]

    # ------------------------------------------------------------------ steps
    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, lengths: torch.Tensor, slot0: int, aids: torch.Tensor) -> torch.Tensor:
        """Run right-padded prompts into cache slots ``slot0 .. slot0+B-1``; returns next-token logits [B, V].

        The prompts' real tokens are packed: every linear sees them as N = sum(lengths) rows of one token each (as
        decode sees its rows), so no GEMM computes a padding position (prompts of 16-64 tokens padded per batch cost
        a third more rows). The prompts are packed in the order of their adapters, so each adapter's tokens are one
        run of rows (`LoraPlan.runs`). Only attention sees them padded, each prompt a row of [B, T], gathered from
        and back into the packed rows. Right padding is exact under a causal mask: a real token at position t only
        sees positions <= t, which are all real. The padded tail writes junk K/V past each prompt; decode overwrites
        position ``length`` first and never attends past a row's own position.

        Args:
            tokens: [B, T] token ids, row i real up to ``lengths[i]``.
            lengths: [B] prompt lengths (>= 1).
            slot0: first cache slot to fill.
            aids: [B] adapter slot per row (0: none).
        """
        B, T = tokens.shape
        self._cache()
        H, Hkv, D = self.shape.n_head, self.shape.n_kv_head, self.shape.head_dim
        order = torch.sort(aids, stable=True).indices  # packing order: prompts by adapter
        starts = torch.empty_like(lengths)
        starts[order] = lengths[order].cumsum(0) - lengths[order]  # [B] each prompt's first packed row
        owner = order.repeat_interleave(lengths[order])  # [N] prompt of each packed row
        positions = torch.arange(len(owner)) - starts[owner]  # [N]
        real = owner * T + positions  # [N] padded index of each packed row
        at = torch.arange(T)
        # [B*T] packed row of each padded position (a padding position repeats its prompt's last token)
        padded = (starts[:, None] + torch.minimum(at[None, :], lengths[:, None] - 1)).view(-1)
        plan = self.plan(aids[owner])  # one adapter slot per packed row, in runs
        x = self._embed(tokens.view(-1)[real][:, None], positions[:, None])  # [N, 1, C]
        rope = self._rope_at(positions[:, None])  # cos, sin [N, 1, 1, D]
        for layer, (norm_1, norm_2) in enumerate(self.norms):
            q, k, v = self._qkv(self._norm(x, norm_1), layer, plan, rope)  # [N, H, 1, D], [N, Hkv, 1, D] x2
            q, k, v = (t.reshape(-1, h * D)[padded].view(B, T, h, D).transpose(1, 2)  # [B, h, T, D]
                       for t, h in ((q, H), (k, Hkv), (v, Hkv)))
            self.k_cache[layer][slot0 : slot0 + B, :, :T] = k
            self.v_cache[layer][slot0 : slot0 + B, :, :T] = v
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               enable_gqa=self.shape.group > 1)  # [B, H, T, D]
            y = y.transpose(1, 2).reshape(B * T, H * D)[real]  # [N, H*D]
            x = x + self._linear(y[:, None], layer, ATTN_OUT, plan)  # [N, 1, C]
            x = x + self._mlp(self._norm(x, norm_2), layer, plan)  # [N, 1, C]
        return self._logits(x[starts + lengths - 1, 0])  # each prompt's last token

    @torch.inference_mode()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, aids: torch.Tensor) -> torch.Tensor:
        """One token for each of the first B slots; returns next-token logits [B, V].

        Args:
            tokens: [B] the token each slot feeds in now.
            positions: [B] its position (= tokens already in the slot's cache).
            aids: [B] adapter slot per row.
        """
        B = tokens.shape[0]
        self._cache()
        plan = self.plan(aids)
        L = int(positions.max()) + 1  # keys to look at: up to the furthest row
        Hkv, G, D = self.shape.n_kv_head, self.shape.group, self.shape.head_dim
        # Where each row's new K/V go in a layer's cache seen as [slot * kv head * position, head_dim]: one
        # index_copy_ (advanced-index assignment on the 4-d cache took several times longer).
        dst = ((torch.arange(B)[:, None] * Hkv + torch.arange(Hkv)[None, :]) * self.shape.context
               + positions[:, None]).view(-1)
        visible = (torch.arange(L)[None, :] <= positions[:, None])[:, None, None, :]  # [B, 1, 1, L]
        bias = torch.zeros(B, 1, 1, L).masked_fill_(~visible, float("-inf"))
        scale = D ** -0.5
        x = self._embed(tokens[:, None], positions[:, None])  # [B, 1, C]
        rope = self._rope_at(positions[:, None])  # cos, sin [B, 1, 1, D]
        for layer, (norm_1, norm_2) in enumerate(self.norms):
            q, k, v = self._qkv(self._norm(x, norm_1), layer, plan, rope)  # [B, H, 1, D], [B, Hkv, 1, D] x2
            kc, vc = self.k_cache[layer], self.v_cache[layer]
            kc.view(-1, D).index_copy_(0, dst, k.reshape(B * Hkv, D))
            vc.view(-1, D).index_copy_(0, dst, v.reshape(B * Hkv, D))
            # One query per row: two batched matmuls and a softmax beat PyTorch's CPU flash-attention kernel
            # here (about 3x per call at 64 rows), whose blocking is made for long queries. The G query heads
            # of a KV head are G rows of one matmul against its keys: K/V are read once, never repeated.
            q = q.reshape(B, Hkv, G, D)  # query head h = kv head h // G
            scores = torch.matmul(q, kc[:B, :, :L].transpose(-1, -2)).mul_(scale).add_(bias)  # [B, Hkv, G, L]
            y = torch.matmul(torch.softmax(scores, dim=-1), vc[:B, :, :L])  # [B, Hkv, G, D]
            x = x + self._linear(y.reshape(B, 1, -1), layer, ATTN_OUT, plan)  # [B, 1, C]
            x = x + self._mlp(self._norm(x, norm_2), layer, plan)  # [B, 1, C]
        return self._logits(x[:, 0])

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy a slot's cache (its first ``length`` positions) to another slot (compaction)."""
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]

    # ------------------------------------------------------------------ pieces
    def _embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[B, T] tokens at ``positions`` (broadcast against them) -> [B, T, C]."""
        x = self.embedding[tokens]
        return x if self.position_table is None else x + self.position_table[positions]

    def _rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """cos and signed sin (`_rope`) at ``positions`` ([T] or [B, 1]), shaped to broadcast over [B, T, heads,
        D]."""
        if self.rope is None:
            return None
        cos, sin = self.rope
        return cos[positions].unsqueeze(-2), sin[positions].unsqueeze(-2)

    def _norm(self, x: torch.Tensor, norm: Norm) -> torch.Tensor:
        C = (self.shape.n_embd,)
        if self.shape.norm == "rms":
            return F.rms_norm(x, C, norm.weight, eps=self.shape.eps)
        return F.layer_norm(x, C, norm.weight, norm.bias, eps=self.shape.eps)

    def _qkv(self, h: torch.Tensor, layer: int, plan: LoraPlan | None, rope) -> tuple[torch.Tensor, ...]:
        """Queries [B, H, T, D], keys and values [B, Hkv, T, D] of the normed input h [B, T, C]."""
        B, T, _ = h.shape
        H, Hkv, D = self.shape.n_head, self.shape.n_kv_head, self.shape.head_dim
        qkv = self._linear(h, layer, QKV, plan)  # [B, T, (H + 2*Hkv) * D]
        qk, v = qkv.split(((H + Hkv) * D, Hkv * D), dim=2)
        qk = qk.view(B, T, H + Hkv, D)
        if rope is not None:
            qk = _rope(qk, *rope)  # queries and keys at once
        q, k = qk.split((H, Hkv), dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.view(B, T, Hkv, D).transpose(1, 2)

    def _mlp(self, h: torch.Tensor, layer: int, plan: LoraPlan | None) -> torch.Tensor:
        """The MLP of the normed input h [B, T, C] -> [B, T, C]."""
        h = self._linear(h, layer, MLP_UP, plan)  # [B, T, F], or [B, T, 2F] = [gate | up]
        if self.shape.activation == "silu_glu":
            gate, up = h.split(self.shape.n_inner, dim=-1)
            h = F.silu(gate) * up  # [B, T, F]
        else:
            h = F.gelu(h, approximate="tanh")
        return self._linear(h, layer, MLP_DOWN, plan)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self._norm(h, self.norm_f))  # [B, V]

    def _linear(self, x: torch.Tensor, layer: int, name: str, plan: LoraPlan | None) -> torch.Tensor:
        """``x @ W + b`` plus each row's LoRA delta. x: [B, T, in] -> [B, T, out]; with a plan, T is 1 (decode's
        rows, or prefill's packed tokens: `prefill`)."""
        B, T, d_in = x.shape
        d_out = self.shape.linear_dims(name)[1]
        x2 = x.reshape(-1, d_in)
        full = self.linears[layer][name](x2)  # [B*T, out (+ the fused adapters' columns)]
        y2 = full[:, :d_out]
        y = y2.view(B, T, d_out)
        key = (layer, name)
        if plan is None or key not in self.bank.a:
            return y
        bank = self.bank
        parts, R = bank.layout[name], bank.rank[name]
        cols = self._fused.get(name, 0) if self._fused_version == bank.version else 0
        if plan.runs is not None:
            # Rows in runs of one adapter each: per run, its rows' x @ A (a slice of the fused GEMM's output, or one
            # matmul) and one matmul per part adding @ B into its rows and columns.
            for slot, lo, hi in plan.runs:
                j = slot - 1
                t = full[lo:hi, d_out + j * R : d_out + (j + 1) * R] if cols else x2[lo:hi] @ bank.a[key][:, j]
                for p, b in zip(parts, bank.b[key]):
                    y2[lo:hi, p.column : p.column + p.width].addmm_(t[:, p.offset : p.offset + p.rank], b[j])
            return y
        if cols:
            # A mixed batch over a small bank: the base GEMM also gave [x @ A_1 | ... | x @ A_S]; each row keeps its
            # own adapter's columns (the others zeroed) and one GEMM per part against the stacked B's adds the
            # deltas.
            t = full[:, d_out:]
            t.view(B, T, cols).mul_(plan.slotmask(cols, R)[:, None, :])
            _add_parts(y2, t, parts, bank.b[key], cols // R, R)
            return y
        kernel = kernels.sgmv()
        if kernel is not None:
            # Punica's SGMV in one compiled call: every row read and written in place, no gather, padding or
            # scatter (`stemma.serve.kernels`; on the Llama serve bench's decode steps it takes ~2/3 of the time of
            # the PyTorch ops below).
            x2 = x2 if x2.stride(1) == 1 else x2.contiguous()
            kernels.call_sgmv(kernel, x2, full, bank.a[key], bank.kernel_parts(name), bank.b_addresses(key),
                              plan.kernel_groups)
            return y
        sel_a, sel_bs = plan.select(bank, key)  # [in, G, R], per part [G, r, width]
        # Without the compiled kernel, Punica's SGMV, padded: rows grouped by adapter, one batched matmul per part
        # over the groups. Each part's output comes back to the batch's row order by a gather (`LoraPlan.inverse`)
        # added into the part's columns. Measured on the Llama serve bench (64 rows, 8 adapters of rank 16 on all
        # seven projections): a scatter-add of the parts' outputs concatenated took several times longer than the
        # gathers, and the batch's adapters concatenated into plain GEMMs over all rows (each row keeping its own
        # adapter's columns) ran 3% slower in all than this.
        G, L = plan.groups, plan.width
        xs = x2.index_select(0, plan.idx).view(G, L, d_in)  # [G, L, in]
        t = torch.bmm(xs, sel_a.permute(1, 0, 2))  # [G, L, R]
        keep = plan.rowmask()
        for p, b in zip(parts, sel_bs):
            d = torch.bmm(t[..., p.offset : p.offset + p.rank], b).view(G * L, p.width).index_select(0, plan.inverse)
            if keep is not None:
                d.mul_(keep.view(-1, 1))  # base rows gathered some group's row; they add nothing
            y2[:, p.column : p.column + p.width].add_(d)
        return y


def _add_parts(y2: torch.Tensor, t: torch.Tensor, parts, bs, n: int, R: int) -> None:
    """``y2[:, part's columns] += t_part @ B_part`` for each part, t [M, n*R] holding n adapters' ``x @ A``
    (adapter-major, R columns each, rows masked to their own adapter) and each B [n, r, width]."""
    if len(parts) == 1:
        p = parts[0]
        y2[:, p.column : p.column + p.width].addmm_(t, bs[0].reshape(n * R, p.width))
        return
    t3 = t.view(t.shape[0], n, R)
    for p, b in zip(parts, bs):
        tp = t3[:, :, p.offset : p.offset + p.rank].reshape(t.shape[0], n * p.rank)
        y2[:, p.column : p.column + p.width].addmm_(tp, b.reshape(n * p.rank, p.width))


def release_free_memory() -> None:
    """Hand memory freed by the process back to the operating system, where the C library allows it.

    Loading a model or an adapter frees many temporaries of a few MB (the model's tensors, fused and transposed
    copies, the bank's previous stacks); glibc's allocator serves such sizes from its heap and keeps freed pages
    mapped, so the resident set would stay at the loading peak. ``malloc_trim(0)`` (glibc) releases every free
    page. Elsewhere (musl, macOS, Windows) this does nothing.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """A contiguous fp32 copy of a model tensor that shares no memory with it."""
    return None if t is None else t.detach().float().clone(memory_format=torch.contiguous_format)


def _own_norm(norm: Norm) -> Norm:
    return Norm(_own(norm.weight), _own(norm.bias))
