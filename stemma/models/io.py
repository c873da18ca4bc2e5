"""Saving models into the store and loading them back, in Hugging Face format.

A full version stores ``config.json``, ``generation_config.json`` (when present) and ``model.safetensors``; an
adapter version stores PEFT's ``adapter_config.json`` and ``adapter_model.safetensors`` and names its parent
version as base. Loading resolves the chain: the root's full weights, then each adapter merged in order.
Only safetensors are ever read: pickle-based checkpoints can run code on load and are refused.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from ..errors import StemmaError, UnsafeArtifactError

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
KEEP_FILES = {"config.json", "generation_config.json", "model.safetensors", "adapter_config.json",
              "adapter_model.safetensors"}


def save_model_files(model, adapter: bool = False, base_ref: str | None = None) -> dict[str, bytes]:
    """Serialise a model (or, with ``adapter``, only its active PEFT adapter) to file name -> bytes."""
    from . import quiet_transformers

    quiet_transformers()
    with tempfile.TemporaryDirectory(prefix="stemma-save-") as d:
        if adapter:
            cfg = model.peft_config[model.active_adapter]
            cfg.base_model_name_or_path = base_ref
            model.save_pretrained(d, safe_serialization=True)
        else:
            model.save_pretrained(d, safe_serialization=True)
        out = {}
        for name in sorted(os.listdir(d)):
            if name in KEEP_FILES:
                out[name] = Path(d, name).read_bytes()
        if adapter:
            # PEFT records its own version and a nested path that carries no lineage; keep the file stable.
            cfg_json = json.loads(out["adapter_config.json"])
            cfg_json["base_model_name_or_path"] = base_ref
            cfg_json.pop("revision", None)
            out["adapter_config.json"] = json.dumps(cfg_json, sort_keys=True, indent=2).encode()
        return out


def check_safe_checkpoint(path: Path) -> list[Path]:
    """Return the safetensors files of a Hugging Face checkpoint directory, refusing pickle-only ones."""
    path = Path(path)
    if not path.is_dir():
        raise StemmaError(f"{path}: not a checkpoint directory")
    if not (path / "config.json").is_file():
        raise StemmaError(f"{path}: no config.json; not a Hugging Face checkpoint")
    safes = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not safes:
        if pickles:
            raise UnsafeArtifactError(
                f"{path}: only pickle weights ({', '.join(p.name for p in pickles)}); stemma loads safetensors only "
                "because pickle can run code on load - convert the checkpoint to safetensors first"
            )
        raise StemmaError(f"{path}: no *.safetensors weights found")
    return safes


def load_hf_dir(path: Path):
    """Load a causal LM from a directory of safetensors weights (never pickle, never remote code)."""
    from transformers import AutoModelForCausalLM

    from . import quiet_transformers

    quiet_transformers()
    check_safe_checkpoint(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), use_safetensors=True, trust_remote_code=False, dtype="float32", local_files_only=True
        )
    except (OSError, ValueError, KeyError) as e:
        raise StemmaError(f"{path}: cannot load checkpoint: {str(e).splitlines()[0]}") from None
    model.eval()
    return model


def materialise(files: dict[str, Path], into: Path) -> Path:
    """Lay out store blobs under their file names (symlinks; the blobs stay read-only in the store)."""
    into.mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        link = into / name
        if link.exists() or link.is_symlink():
            link.unlink()
        link.symlink_to(src)
    return into


def apply_adapter(base_model, adapter_dir: Path, merge: bool = True):
    """Apply a stored PEFT adapter to a (plain) model; merge it into the weights unless asked not to."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base_model, str(adapter_dir), is_trainable=False)
    if merge:
        model = model.merge_and_unload()
    model.eval()
    return model
