"""The release verbs: release (signed directory with model card and ML-BOM) and verify."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app
from .console import open_ws, out


@app.command()
def release(
    node: str = typer.Argument(..., help="node or node@version"),
    fmt: str = typer.Option("hf", "--format", help="hf (merged Hugging Face directory), adapter (PEFT adapter + "
                            "base/) or gguf (llama.cpp)."),
    license: str = typer.Option(None, "--license", help="Release licence (SPDX expression); default: the one the "
                                "licence obligations of the lineage imply."),
    key: Path = typer.Option(..., "--key", help="EC P-256 private key (PEM) to sign with."),
    out_dir: Path = typer.Option(..., "--out", help="Directory to create."),
) -> None:
    """Write a signed release: the model's files, a model card, a CycloneDX ML-BOM and a signature; refused when the
    release gate fails, a risk flag reaches the version, or the licence drops an obligation."""
    from ..release import release as run_release

    r = run_release(open_ws(), node, out_dir, key, fmt=fmt, license=license)
    out.print(f"released {r.node}@{r.version[:12]} ({r.format}, {r.license}) to {r.path}: {r.files} files, "
              f"release #{r.release_id}, ML-BOM sha256 {r.bom_digest[:12]}", highlight=False)


@app.command()
def verify(
    directory: Path = typer.Argument(..., help="A release directory."),
    public_key: Path = typer.Option(None, "--public-key", help="The signer's public key (PEM); default: the key "
                                    "the release carries, which proves integrity but not origin."),
) -> None:
    """Check a release: its signature, every file's hash, and that its ML-BOM lists exactly its files."""
    from ..errors import StemmaError
    from ..release import verify as run_verify

    try:
        ws = open_ws()
    except StemmaError:  # no stemma home here: nothing to compare with
        ws = None
    v = run_verify(directory, public_key, ws)
    how = "the given public key" if v.origin else \
        "the release's own public key: this proves integrity, not origin (pass --public-key to check the signer)"
    out.print(f"verified {v.path}: {v.node}@{v.version[:12]}, {v.files} files, signature by {how}", highlight=False)
    if v.recorded:
        out.print(f"recorded in this registry as {v.recorded}, signed with the key recorded there", highlight=False)
