"""Compressed layers, and the variant file format that stores them.

A compressed version stores ``config.json`` (the Hugging Face config of the model it stands for),
``variant.json`` (which module is stored how) and ``variant.safetensors`` (the tensors: int8 or packed int4
weights with their scales, low-rank factors, or sparse masks with their values, plus every untouched
tensor as is). Loading builds the model's skeleton on the ``meta`` device, swaps in the compressed modules
and assigns the stored tensors, so an int8 model never exists in fp32 in memory: the weights are
dequantised inside ``forward``.

Module kinds (``variant.json`` -> ``modules`` -> name -> ``kind``):

- ``int8``: per-output-channel symmetric int8, weight-only (LLM.int8() without the outlier split,
  Dettmers et al., 2022; the per-channel absmax scheme of Jacob et al., 2018).
- ``int4``: group-wise symmetric int4, weight-only, two values per byte, one fp16 scale per group of
  input channels, scales chosen by a small clipping search (as in GPTQ / AWQ's group-wise formats,
  Frantar et al., 2023; Lin et al., 2024, without their calibration data).
- ``lowrank``: ``W ~ A @ B`` from a truncated SVD (Eckart-Young; Denton et al., 2014).
- ``sparse``: magnitude-pruned weight stored as a packed bit mask plus its non-zero values; densified on load
  (Han et al., 2015).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import StemmaError

FORMAT = "stemma-variant/1"


# ---------------------------------------------------------------------------------------------- helpers
def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as [out, in], whether the module is ``nn.Linear`` or GPT-2's ``Conv1D`` (stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    if type(module).__name__ == "Conv1D":
        return module.weight.detach().t()
    raise TypeError(f"not a linear layer: {type(module).__name__}")


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def tied_lm_head(model: nn.Module) -> bool:
    """True when the output projection shares its weight with the input embedding (``tie_word_embeddings``)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    w = getattr(head, "weight", None) if head is not None else None
    return w is not None and isinstance(emb, nn.Embedding) and w is emb.weight


def base_architecture(manifest: dict[str, Any]) -> dict[str, Any]:
    """The parent's architecture facts without its adapter: a variant stores the merged model."""
    return {k: v for k, v in manifest["architecture"].items() if k not in ("adapter", "variant")}


def output_name(model: nn.Module) -> str | None:
    """The module name of the output head (``lm_head`` in both families), or None if the model has none."""
    head = model.get_output_embeddings()
    for n, m in model.named_modules():
        if m is head:
            return n
    return None


# ---------------------------------------------------------------------------------------------- quantisation
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (int8 [out, in], fp32 scale [out]): w ~ q * scale[:, None]."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def int4_group(cols: int, group_size: int) -> int:
    """The group size actually used: the requested one if it divides the row, else the row itself."""
    g = min(group_size, cols)
    return g if cols % g == 0 and g % 2 == 0 else cols


def quantize_int4(w: torch.Tensor, group_size: int, clip_grid: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (uint8 [out, in/2] two nibbles per byte, fp16 scale [out, in/group]).

    Values are symmetric in [-8, 7] (stored +8). Per group, the clipping ratio in (0.75, 1] with the least
    squared error is kept: a plain absmax scale wastes levels on rare large weights.
    """
    out_f, in_f = w.shape
    g = int4_group(in_f, group_size)
    wg = w.float().reshape(out_f, in_f // g, g)
    absmax = wg.abs().amax(dim=2).clamp(min=1e-12)
    best_err = torch.full_like(absmax, float("inf"))
    best_scale = absmax / 7.0
    for i in range(max(1, clip_grid)):
        ratio = 1.0 - 0.25 * i / max(1, clip_grid)
        scale = absmax * ratio / 7.0
        q = torch.round(wg / scale[..., None]).clamp(-8, 7)
        err = ((q * scale[..., None] - wg) ** 2).sum(dim=2)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
    scale16 = best_scale.to(torch.float16)
    q = torch.round(wg / scale16.float()[..., None]).clamp(-8, 7).to(torch.int16) + 8
    q = q.reshape(out_f, in_f).to(torch.uint8)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    return packed, scale16.contiguous()


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize_int4` (rows may be any subset: packed [n, in/2], scales [n, in/group])."""
    n = packed.shape[0]
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, -1).to(torch.float32) - 8.0
    groups = scales.shape[1]
    return (q.reshape(n, groups, -1) * scales.float()[..., None]).reshape(n, -1)


class QuantLinear(nn.Module):
    """A weight-only quantised linear layer: int8 per output channel, or int4 per group; fp32 activations."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 0, bias: bool = True,
                 device: Any = None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        if bits == 8:
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
            self.group_size = in_features
        else:
            self.group_size = int4_group(in_features, group_size)
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(out_features, in_features // self.group_size,
                                                       dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, module: nn.Module, bits: int, group_size: int = 0) -> QuantLinear:
        w = linear_weight(module)
        new = cls(w.shape[1], w.shape[0], bits, group_size, bias=module.bias is not None)
        new.qweight, new.scales = quantize_int8(w) if bits == 8 else quantize_int4(w, new.group_size)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
        return new

    def dequantized(self) -> torch.Tensor:
        """The weight as fp32 [out, in]."""
        if self.bits == 8:
            return self.qweight.float() * self.scales[:, None]
        return dequantize_int4(self.qweight, self.scales)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantised rows ``idx`` only (an embedding lookup touches a few rows of a large table)."""
        if self.bits == 8:
            return self.qweight[idx].float() * self.scales[idx][..., None]
        flat = idx.reshape(-1)
        return dequantize_int4(self.qweight[flat], self.scales[flat]).reshape(*idx.shape, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [..., in] -> [..., out]
        if self.bits == 8 and x.dtype == torch.float32 and hasattr(torch, "_weight_int8pack_mm"):
            # PyTorch's weight-only int8 GEMM: no fp32 copy of the weight is materialised.
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features).contiguous(), self.qweight, self.scales)
            y = y.reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"


class QuantEmbedding(nn.Module):
    """An embedding table stored like `QuantLinear` (rows = tokens); only looked-up rows are dequantised."""

    def __init__(self, table: QuantLinear):
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.rows(ids)

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads ``.weight`` for shape and dtype checks; a dequantised view answers them.
        return self.table.dequantized()


class TiedQuantHead(nn.Module):
    """The output projection of a model whose head shares the (quantised) embedding table."""

    def __init__(self, embedding: QuantEmbedding):
        super().__init__()
        # Not a submodule: the table belongs to the embedding, and must be stored once.
        object.__setattr__(self, "_embedding", embedding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self._embedding.table
        return F.linear(x, table.dequantized()) if table.bits == 4 else table(x)


# ---------------------------------------------------------------------------------------------- low rank
class LowRankLinear(nn.Module):
    """y = (x @ A) @ B + bias, with A [in, r] and B [r, out]: two thin GEMMs instead of one wide one."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, dtype=torch.float32,
                 device: Any = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(in_features, rank, dtype=dtype, device=device), requires_grad=False)
        self.B = nn.Parameter(torch.empty(rank, out_features, dtype=dtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, module: nn.Module, rank: int, dtype=torch.float32) -> LowRankLinear:
        w = linear_weight(module).float().t()  # [in, out]
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        new = cls(w.shape[0], w.shape[1], rank, bias=module.bias is not None, dtype=dtype)
        root = s[:rank].sqrt()  # split the singular values evenly: both factors stay well scaled in fp16
        new.A = nn.Parameter((u[:, :rank] * root).to(dtype).contiguous(), requires_grad=False)
        new.B = nn.Parameter((root[:, None] * vh[:rank]).to(dtype).contiguous(), requires_grad=False)
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().float().clone(), requires_grad=False)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.A.to(x.dtype)) @ self.B.to(x.dtype)
        return y if self.bias is None else y + self.bias

    def dense(self) -> torch.Tensor:
        """The weight as fp32 [out, in]."""
        return (self.A.float() @ self.B.float()).t()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"


def rank_for_energy(s: torch.Tensor, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the squared Frobenius norm."""
    e = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum()
    return int(torch.searchsorted(e, torch.tensor(energy, dtype=e.dtype)).item()) + 1


# ---------------------------------------------------------------------------------------------- sparse
def pack_sparse(w: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A dense tensor with zeros -> packed bit mask (uint8) + its non-zero values in ``dtype``."""
    mask = (w != 0).reshape(-1)
    pad = (-mask.numel()) % 8
    bits = torch.cat([mask, mask.new_zeros(pad)]).reshape(-1, 8).to(torch.uint8)
    packed = (bits << torch.arange(8, dtype=torch.uint8)).sum(dim=1).to(torch.uint8)
    return {"mask": packed.contiguous(), "values": w.reshape(-1)[mask].to(dtype).contiguous()}


def unpack_sparse(mask: torch.Tensor, values: torch.Tensor, shape: list[int]) -> torch.Tensor:
    n = math.prod(shape)
    bits = ((mask[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n].bool()
    out = torch.zeros(n, dtype=torch.float32)
    out[bits] = values.float()
    return out.reshape(shape)


# ---------------------------------------------------------------------------------------------- file format
def save_variant(model: nn.Module, scheme: dict[str, Any], modules: dict[str, dict[str, Any]],
                 extra_tensors: dict[str, torch.Tensor] | None = None) -> dict[str, bytes]:
    """Serialise a model whose compressed modules are already swapped in.

    Args:
        model: the model (compressed modules in place; ``sparse`` modules still dense, see ``extra_tensors``).
        scheme: what was done, for humans and for the model card (method, bits, rank, sparsity ...).
        modules: module name -> description (``kind`` and the shape facts its skeleton needs).
        extra_tensors: tensors stored instead of a module's own (the packed form of ``sparse`` weights).
    """
    from safetensors.torch import save

    positions = getattr(model.config, "n_positions", None)
    if positions:  # GPT-2 configs: llama.cpp's converter reads n_ctx, which recent GPT2Config no longer writes
        model.config.n_ctx = positions
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    sparse_prefixes = tuple(f"{n}.weight" for n, d in modules.items() if d["kind"] == "sparse")
    for k, t in model.state_dict(keep_vars=False).items():
        if k in sparse_prefixes or t.data_ptr() in seen and t.numel() > 0:
            continue  # tied tensors are stored once; sparse weights go in packed form
        seen.add(t.data_ptr())
        state[k] = t.detach().contiguous().clone()
    for k, t in (extra_tensors or {}).items():
        state[k] = t.contiguous()
    desc = {"format": FORMAT, "scheme": scheme, "tied_head": tied_lm_head(model) or any(
        d["kind"] == "tied_head" for d in modules.values()), "modules": modules}
    return {
        "config.json": model.config.to_json_string(use_diff=False).encode(),
        "variant.json": json.dumps(desc, sort_keys=True, indent=2).encode(),
        "variant.safetensors": save(state, metadata={"format": FORMAT}),
    }


def load_variant(files: dict[str, Path]):
    """Build a model from its variant files: skeleton on ``meta``, compressed modules swapped in, tensors assigned.

    Non-persistent buffers (RoPE's frequencies) are not in the file; the model's family recomputes them
    (`Family.restore_buffers`), and anything still on ``meta`` afterwards is refused.
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..models import quiet_transformers

    quiet_transformers()
    for need in ("config.json", "variant.json", "variant.safetensors"):
        if need not in files:
            raise StemmaError(f"variant is missing {need}")
    desc = json.loads(Path(files["variant.json"]).read_text())
    if desc.get("format") != FORMAT:
        raise StemmaError(f"unknown variant format {desc.get('format')!r}")
    config = AutoConfig.from_pretrained(str(Path(files["config.json"]).parent))
    state = load_file(str(files["variant.safetensors"]))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for name, d in desc["modules"].items():
        kind = d["kind"]
        if kind in ("int8", "int4"):
            q = QuantLinear(d["in"], d["out"], 8 if kind == "int8" else 4, d.get("group", 0), bias=d["bias"],
                            device="meta")
            set_module(model, name, QuantEmbedding(q) if d.get("embedding") else q)
        elif kind == "lowrank":
            set_module(model, name, LowRankLinear(d["in"], d["out"], d["rank"], bias=d["bias"],
                                                  dtype=getattr(torch, d.get("dtype", "float32")), device="meta"))
        elif kind == "sparse":
            dense = unpack_sparse(state.pop(f"{name}.weight.mask"), state.pop(f"{name}.weight.values"), d["shape"])
            state[f"{name}.weight"] = dense
        elif kind == "tied_head":
            pass
        else:
            raise StemmaError(f"unknown compressed module kind {kind!r} in variant.json")
    for name, d in desc["modules"].items():
        if d["kind"] == "tied_head":
            set_module(model, name, TiedQuantHead(model.get_submodule(d["embedding"])))
    tied = desc.get("tied_head") and not any(d["kind"] == "tied_head" for d in desc["modules"].values())
    try:
        model.load_state_dict(state, strict=not tied, assign=True)
    except RuntimeError as e:
        raise StemmaError(f"variant weights do not match variant.json: {str(e).splitlines()[0]}") from None
    if tied:
        model.tie_weights()
    from ..models import families

    families.of(model.config).restore_buffers(model)  # non-persistent buffers (RoPE) are not in the file
    leftovers = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftovers:
        raise StemmaError(f"variant weights are missing {', '.join(leftovers[:3])}")
    model.eval()
    return model


def compressed_nbytes(model: nn.Module) -> int:
    """Bytes of every distinct parameter and buffer (what the weights occupy in memory)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
