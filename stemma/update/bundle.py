"""The update file: one safetensors file carrying a signed delta.

Tensors: the dense change of each weight it touches, under the parent model's own state-dict names and
shapes (an adapter trained locally is sent as its merged product, so every strategy aggregates plain weight
deltas), plus optionally ``heldout.ids``: token ids of a held-out sample of the contributor's data, which the
parent's gate uses to check that the aggregate helps the contributors.

Metadata: ``stemma.update`` (the header, canonical JSON) and ``stemma.signature`` (ed25519, hex) over
sha256(header || tensor digest). safetensors holds no code, so reading a hostile file cannot run anything;
still, before anything parses it, the file is scanned (`stemma.scan`, modelscan): a pickle (bare, or in a
PyTorch archive) is refused with the scanner's finding, and the passing scan comes back with the file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import StemmaError
from ..scan import check_bytes
from ..store import canonical_json
from .keys import SignatureError, sign

FORMAT = 1
HELDOUT = "heldout.ids"
MAX_BYTES = 4 << 30
KINDS = ("lora", "full")
RESERVED = ("received",)
"""Header fields the server writes into an update's record (`stemma.update.service.submit`), never a sender."""


class UpdateError(StemmaError):
    """An update is malformed or does not fit the version it names."""


def tensor_digest(tensors: dict[str, torch.Tensor]) -> bytes:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.digest()


def signed_digest(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    return hashlib.sha256(canonical_json(header) + tensor_digest(tensors)).digest()


@dataclass
class UpdateFile:
    header: dict[str, Any]
    signature: str
    delta: dict[str, torch.Tensor]
    heldout: torch.Tensor | None
    raw: bytes
    scan: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The passing scan of the file (`stemma.scan.ScanReport.record`)."""

    @property
    def id(self) -> str:
        return hashlib.sha256(self.raw).hexdigest()

    @functools.cached_property
    def digest(self) -> bytes:
        """What the signature signs (computed once: verifying, replay and the received record all read it)."""
        tensors = dict(self.delta)
        if self.heldout is not None:
            tensors[HELDOUT] = self.heldout
        return signed_digest(self.header, tensors)

    @functools.cached_property
    def delta_digest(self) -> bytes:
        """The delta's tensors alone: two contributors sending the same delta are copies of one update."""
        return tensor_digest(self.delta)


def make_header(*, node: str, parent: str, tokenizer: str, contributor: str, kind: str, n_examples: int,
                n_tokens: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"format": FORMAT, "node": node, "parent": parent, "tokenizer": tokenizer, "contributor": contributor,
            "kind": kind, "n_examples": int(n_examples), "n_tokens": int(n_tokens),
            "created": datetime.now(UTC).isoformat(timespec="seconds"), **(extra or {})}


def encode(header: dict[str, Any], delta: dict[str, torch.Tensor], heldout: torch.Tensor | None, key) -> bytes:
    """Serialise and sign an update (``key``: an ed25519 private key, or None for an unsigned file)."""
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in delta.items()}
    if HELDOUT in tensors:
        raise UpdateError(f"{HELDOUT} is reserved")
    if heldout is not None:
        tensors[HELDOUT] = heldout.detach().to(torch.long).contiguous().cpu()
    meta = {"stemma.update": canonical_json(header).decode()}
    if key is not None:
        meta["stemma.signature"] = sign(key, signed_digest(header, tensors))
    return st_save(tensors, metadata=meta)


def write(path: str | Path, data: bytes) -> Path:
    """Write atomically (a temp file renamed into place): a failed write leaves nothing behind."""
    p = Path(path)
    if not p.parent.is_dir():
        raise StemmaError(f"{p.parent}: no such directory")
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(p)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StemmaError(f"{p}: cannot write ({e.strerror})") from None
    return p


def _metadata(raw: bytes) -> dict[str, str]:
    """The safetensors header's ``__metadata__`` (read without loading tensors)."""
    if len(raw) < 8:
        raise UpdateError("not a safetensors file (too short)")
    n = int.from_bytes(raw[:8], "little")
    if n <= 0 or 8 + n > len(raw) or n > 100 << 20:
        raise UpdateError("not a safetensors file (bad header length)")
    try:
        head = json.loads(raw[8: 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise UpdateError("not a safetensors file (header is not JSON)") from None
    meta = head.get("__metadata__") if isinstance(head, dict) else None
    return meta if isinstance(meta, dict) else {}


def decode(raw: bytes, source: str = "update", scan: dict[str, Any] | None = None) -> UpdateFile:
    """Parse an update file; checks structure, not the signature (see `stemma.update.service.verify`).

    The bytes are scanned first, unless ``scan`` is the passing scan recorded when these very bytes were received
    (an update read back from the content-addressed store: scanning it again would find the same)."""
    if len(raw) > MAX_BYTES:
        raise UpdateError(f"{source}: {len(raw)} bytes is larger than an update may be")
    if scan is None:
        scan = check_bytes(raw, source).record()
    try:
        meta = _metadata(raw)
        tensors = st_load(raw)
    except (SafetensorError, UpdateError) as e:
        raise UpdateError(f"{source}: {e}") from None
    if "stemma.update" not in meta:
        raise UpdateError(f"{source}: not a stemma update (no stemma.update header)")
    try:
        header = json.loads(meta["stemma.update"])
    except json.JSONDecodeError:
        raise UpdateError(f"{source}: its header is not JSON") from None
    for field, typ in (("node", str), ("parent", str), ("tokenizer", str), ("contributor", str), ("kind", str),
                       ("n_examples", int), ("n_tokens", int)):
        if not isinstance(header.get(field), typ):
            raise UpdateError(f"{source}: header field {field!r} missing or not a {typ.__name__}")
    for reserved in RESERVED:
        if reserved in header:
            raise UpdateError(f"{source}: header field {reserved!r} is reserved for the receiving server")
    if header.get("format") != FORMAT:
        raise UpdateError(f"{source}: update format {header.get('format')!r} is not {FORMAT}")
    if header["kind"] not in KINDS:
        raise UpdateError(f"{source}: kind {header['kind']!r} is not one of {', '.join(KINDS)}")
    if header["n_examples"] < 1:
        raise UpdateError(f"{source}: n_examples must be >= 1")
    sig = meta.get("stemma.signature")
    if not sig:
        raise SignatureError(f"{source}: the update is not signed")
    heldout = tensors.pop(HELDOUT, None)
    if heldout is not None and (heldout.dtype != torch.long or heldout.dim() != 1):
        raise UpdateError(f"{source}: {HELDOUT} must be a 1-D int64 tensor")
    if not tensors:
        raise UpdateError(f"{source}: the update changes no weight")
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise UpdateError(f"{source}: delta {name} is not floating point")
        if not bool(torch.isfinite(t).all()):
            raise UpdateError(f"{source}: delta {name} holds NaN or infinite values")
    return UpdateFile(header=header, signature=sig, delta=tensors, heldout=heldout, raw=raw, scan=scan)


def read(path: str | Path) -> UpdateFile:
    p = Path(path)
    if not p.is_file():
        raise StemmaError(f"{p}: no such file")
    return decode(p.read_bytes(), str(p))


def delta_norm(delta: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in delta.values()))
