"""`import`: a local Hugging Face checkpoint directory becomes the master (safetensors only).

Lineage is by content: the recipe hashes the checkpoint's files, never its path, so moving the directory
changes nothing and changing a weight changes the version. The directory is scanned (`stemma.scan`) before
anything reads it, at the build's pre-flight and again when the version is made; a pickle-based or flagged
file refuses it, and the passing scan goes into the version's manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import StemmaError
from ..licenses import checkpoint_license, parse_release_license
from ..models import families
from ..models.arch import count_params
from ..models.io import check_safe_checkpoint, load_hf_dir, save_model_files
from ..models.tokenizer import tokenizer_to_bytes
from ..scan import ScanReport, check_dir
from ..store import sha256_file
from .registry import BuildContext, BuildMethod, BuildOutput, Planned, register


@dataclass(frozen=True)
class ImportConfig:
    """A master taken from a local checkpoint."""

    path: str
    """Checkpoint directory (config.json, *.safetensors, tokenizer.json); relative paths are resolved against
    the directory of stemma.yaml."""
    license: str | None = None
    """The checkpoint's licence (an SPDX expression); its obligations reach every version derived from it
    (`stemma.licenses`). The checkpoint's own README metadata or LICENSE text is recorded as well."""


def _resolve(cfg: ImportConfig, spec_dir: Path) -> Path:
    p = Path(cfg.path).expanduser()
    return p if p.is_absolute() else (spec_dir / p)


def scanned(path: Path) -> ScanReport:
    """Scan the checkpoint directory before anything else reads it; refuse it unless the scan passed."""
    if not path.is_dir():
        raise StemmaError(f"{path}: not a checkpoint directory")
    return check_dir(path, f"checkpoint {path}")


def check_architecture(path: Path):
    """The checkpoint's Hugging Face config; refused, before anything loads or trains, when stemma does not
    implement its family or features."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise StemmaError(f"{path}: cannot read config.json: {str(e).splitlines()[0]}") from None
    try:
        families.checked(config)
    except StemmaError as e:
        raise type(e)(f"{path}: {e}") from None
    return config


@register
class Import(BuildMethod):
    name = "import"
    relation = "import"
    config_cls = ImportConfig
    root = True
    needs_dataset = False

    def recipe_config(self, cfg: ImportConfig) -> dict:
        # the path only locates the checkpoint; its content (recipe_inputs) identifies it
        return {"license": cfg.license} if cfg.license else {}

    def recipe_inputs(self, cfg: ImportConfig, spec_dir: Path) -> dict:
        path = _resolve(cfg, spec_dir)
        scanned(path)
        safes = check_safe_checkpoint(path)
        check_architecture(path)
        if not (path / "tokenizer.json").is_file():
            raise StemmaError(f"{path}: no tokenizer.json (a fast tokenizer is required to share it across the tree)")
        files = [*safes, path / "config.json", path / "tokenizer.json"]
        if cfg.license:
            try:
                parse_release_license(cfg.license)
            except StemmaError as e:
                raise StemmaError(f"import config license: {e}") from None
        stated = checkpoint_license(path)
        return {"checkpoint": {f.name: sha256_file(f) for f in files}, **({"license": stated} if stated else {})}

    def plan(self, cfg: ImportConfig, parent, spec, node) -> Planned:
        """The checkpoint's own config, read as `recipe_inputs` read and checked it (the build calls the two on
        separate instances, so nothing read there is at hand here)."""
        return Planned(check_architecture(_resolve(cfg, spec.root_dir)))

    def run(self, ctx: BuildContext, cfg: ImportConfig) -> BuildOutput:
        from tokenizers import Tokenizer

        path = _resolve(cfg, ctx.spec_dir)
        scan = scanned(path)  # again: the directory may have changed since the pre-flight
        with ctx.reporter.task(f"{ctx.node}: import {path.name}", total=None):
            model = load_hf_dir(path)
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        if tok.get_vocab_size() > model.get_input_embeddings().weight.shape[0]:
            raise StemmaError(f"{path}: tokenizer has more tokens than the model's embedding matrix")
        digest = ctx.ws.store.put_bytes(tokenizer_to_bytes(tok))
        n = count_params(model)
        return BuildOutput(files=save_model_files(model), tokenizer=digest, params=n, own_params=n,
                           architecture=families.of(model.config).describe(model.config), scan=scan.record())
