"""Materialise a version as a directory that plain transformers / peft load.

``merged``: the whole adapter chain merged into full weights (a compressed variant expanded to dense weights),
a standard Hugging Face model directory.
``adapter``: for an adapter version, PEFT's adapter files plus ``base/``, the model the adapter applies to (its load
plan's base with the adapters above it merged):
``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DIR/base), DIR)``.
What a version is comes from its load plan (`stemma.lineage.LoadPlan`), never from its file names.
Both carry the tokenizer and a ``stemma.json`` with the content-addressed lineage. The directory is
written beside its destination and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import StemmaError
from .models.tokenizer import hf_tokenizer
from .store import check_out_dir, staged_dir
from .workspace import Workspace

FORMATS = ("merged", "adapter")


def export(ws: Workspace, ref: str, out: Path, fmt: str = "merged", force: bool = False) -> Path:
    """Write the version ``ref`` names to ``out`` as ``fmt`` (see the module docstring); returns the directory.

    Raises:
        StemmaError: unknown format or version, a non-empty ``out`` without ``force``, ``adapter`` for a version
            that is not an adapter, or a corrupt blob (nothing is left in ``out``).
    """
    from .lineage import ADAPTER
    from .pull import dense_model

    if fmt not in FORMATS:
        raise StemmaError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    v = ws.resolve_version(ref)
    out = check_out_dir(out, force)
    plan = ws.plan(v.id)
    if fmt == "adapter" and plan.kind != ADAPTER:
        raise StemmaError(f"{v.row.node_path} is a {v.row.relation} version, not an adapter; export it merged")
    with staged_dir(out, force) as tmp:
        tok = hf_tokenizer(ws.tokenizer(v.row.tokenizer))
        chain = ws.chain(v.id)
        if fmt == "merged":
            dense_model(ws.load_model(v.id)).save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
        else:
            base = ws.load_model(v.id, below=True)
            base.save_pretrained(tmp / "base", safe_serialization=True)
            tok.save_pretrained(tmp / "base")
            write_adapter(ws, plan, tmp, base="base")
            tok.save_pretrained(tmp)
        lineage = {
            "version": v.id,
            "node": v.row.node_path,
            "format": fmt,
            "chain": [{"node": c.row.node_path, "version": c.id, "relation": c.row.relation} for c in chain],
            "tokenizer": v.row.tokenizer,
            "base": plan.base.id,
            "adapters": [a.id for a in plan.adapters],
        }
        (tmp / "stemma.json").write_text(json.dumps(lineage, indent=2))
    return out


def write_adapter(ws: Workspace, plan, into: Path, base: str) -> None:
    """Copy an adapter version's PEFT files (verified) into ``into``, its ``adapter_config.json`` naming ``base``
    as the model it applies to."""
    into.mkdir(parents=True, exist_ok=True)
    for name, digest in plan.version.files:
        shutil.copyfile(ws.store.verified_path(digest), into / name)
    cfg = json.loads((into / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base
    (into / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
