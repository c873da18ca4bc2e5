"""The release's ML-BOM: CycloneDX 1.6 JSON written with cyclonedx-python-lib and validated against the 1.6 schema.

- ``metadata.component``: the model (type ``machine-learning-model``, hash = its version id, the sha256 of its
  manifest), its release licence, and in its ``pedigree.ancestors`` every version above it up to the master, each
  with its version id as hash.
- ``components``: every dataset along the lineage (type ``data``, hash = dataset id, licences, datasheet counts)
  and every file of the release directory but the BOM and the signature (type ``file``, sha256 of its bytes).
- The library does not model 1.6's ``modelCard`` and component ``data``: they are added to its JSON output
  (``modelCard``: approach, task, architecture, datasets by reference, metrics, use cases, limitations; ``data``:
  the datasheet) before the whole is validated.

What CycloneDX cannot express is kept in properties named ``stemma:*``:

| property | on | value |
|---|---|---|
| ``stemma:node``, ``stemma:relation``, ``stemma:method`` | model, ancestors | the version's node and how it was made |
| ``stemma:version`` | model, ancestors | the full version id (the sha256 of its manifest) |
| ``stemma:format`` | model | ``hf``, ``adapter`` or ``gguf`` |
| ``stemma:recipe-key`` | model | the recipe's cache key |
| ``stemma:tokenizer`` | model | the sha256 of its tokenizer.json blob |
| ``stemma:license-obligation`` | model | one per obligation: ``ID; kinds; source (chain)`` |
| ``stemma:license-note`` | model | a source without a recorded licence |
| ``stemma:release-gate`` | model | one per gate line, or ``none`` |
| ``stemma:signature`` | model | the signature file and method |
| ``stemma:generation`` | ancestors | 0 for the master, then down the chain (CycloneDX keeps no order) |
| ``stemma:dataset-seq``, ``stemma:role``, ``stemma:trained-into`` | dataset | its version number, role, version |
| ``stemma:count:NAME`` | dataset | the datasheet's counts (documents, train_documents, ...) |
| ``stemma:license-documents:EXPR`` | dataset | documents per licence expression |
| ``stemma:curation`` | dataset | its curation steps in order |
| ``stemma:train-sha256``, ``stemma:test-sha256`` | dataset data | the split files' hashes |
"""

from __future__ import annotations

import json

from ..errors import StemmaError
from ..licenses import is_spdx
from .facts import DatasetFact, Facts

BOM_FILE = "bom.cdx.json"


def _props(pairs) -> list:
    from cyclonedx.model import Property

    return [Property(name=k, value=str(v)) for k, v in pairs]


def _sha256(digest: str) -> list:
    from cyclonedx.model import HashAlgorithm, HashType

    return [HashType(alg=HashAlgorithm.SHA_256, content=digest)]


def _licenses(expressions: list[str]) -> list:
    """One SPDX expression for all (when every one parses), else each licence by SPDX id or, failing that, by name
    (CycloneDX takes either one expression or a list of licences)."""
    from cyclonedx.model.license import DisjunctiveLicense, LicenseExpression
    from cyclonedx.spdx import fixup_id

    if expressions and all(is_spdx(e) for e in expressions):
        joined = " AND ".join(f"({e})" if " " in e else e for e in expressions)
        return [LicenseExpression(joined)]
    return [DisjunctiveLicense(id=fixup_id(e)) if fixup_id(e) else DisjunctiveLicense(name=e) for e in expressions]


def _dataset(d: DatasetFact):
    from cyclonedx.model.component import Component, ComponentType

    props = [("stemma:dataset-seq", d.seq), ("stemma:role", d.role), ("stemma:trained-into", d.version)]
    props += [(f"stemma:count:{k}", n) for k, n in d.counts]
    props += [(f"stemma:license-documents:{e}", n) for e, n in d.licenses]
    props += [("stemma:curation", ", ".join(d.steps) or "none")]
    lic = [e for e, _ in d.licenses if e != "unknown"] or ([d.license] if d.license and d.license != "mixed" else [])
    return Component(name=d.name, type=ComponentType.DATA, version=str(d.seq), bom_ref=f"dataset:{d.id}",
                     hashes=_sha256(d.id), licenses=_licenses(lic), properties=_props(props),
                     description=f"{d.language or 'unrecorded language'}, {d.domain or 'no domain'}")


def _ancestor(c, generation: int):
    from cyclonedx.model.component import Component, ComponentType

    return Component(name=c.row.node_path, type=ComponentType.MACHINE_LEARNING_MODEL, version=c.short,
                     bom_ref=f"version:{c.id}", hashes=_sha256(c.id),
                     properties=_props([("stemma:version", c.id), ("stemma:node", c.row.node_path),
                                        ("stemma:relation", c.row.relation), ("stemma:method", c.row.method),
                                        ("stemma:generation", generation)]))


def make_bom(f: Facts, files: dict[str, str]) -> str:
    """The BOM as JSON text; ``files`` maps each file of the release (relative path) to its sha256."""
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from cyclonedx.model.license import LicenseExpression
    from cyclonedx.output.json import JsonV1Dot6

    v = f.version
    props = [("stemma:version", v.id), ("stemma:node", v.row.node_path), ("stemma:relation", v.row.relation),
             ("stemma:method", v.row.method), ("stemma:format", f.format), ("stemma:recipe-key", v.row.recipe_key),
             ("stemma:tokenizer", v.row.tokenizer)]
    props += [("stemma:license-obligation", f"{o.license}; {', '.join(o.kinds) or 'none'}; {o.carried}")
              for o in f.licensing.obligations]
    props += [("stemma:license-note", n) for n in f.licensing.notes]
    props += [("stemma:release-gate", line) for line in f.gate] or [("stemma:release-gate", "none")]
    props += [("stemma:signature", "model.sig: OpenSSF model signing, key method (ECDSA P-256)")]
    model = Component(name=v.row.node_path, type=ComponentType.MACHINE_LEARNING_MODEL, version=v.short,
                      bom_ref="model", hashes=_sha256(v.id), licenses=[LicenseExpression(f.license)],
                      properties=_props(props),
                      pedigree=Pedigree(ancestors=[_ancestor(c, i) for i, c in enumerate(f.chain[:-1])]))
    bom = Bom()
    bom.metadata.component = model
    datasets = [_dataset(d) for d in f.datasets]
    for c in datasets:
        bom.components.add(c)
    bom.register_dependency(model, datasets)
    for path, digest in sorted(files.items()):
        bom.components.add(Component(name=path, type=ComponentType.FILE, bom_ref=f"file:{path}",
                                     hashes=_sha256(digest)))
    doc = json.loads(JsonV1Dot6(bom).output_as_string())
    doc["metadata"]["component"]["modelCard"] = _model_card(f)
    for comp in doc.get("components", []):
        ref = comp.get("bom-ref", "")
        if ref.startswith("dataset:"):
            comp["data"] = [_data(next(d for d in f.datasets if f"dataset:{d.id}" == ref))]
    text = json.dumps(doc, indent=2, sort_keys=False)
    validate(text)
    return text


def validate(text: str) -> None:
    """Refuse JSON that is not a valid CycloneDX 1.6 document (the library's strict JSON-schema validator)."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        raise StemmaError(f"the ML-BOM is not valid CycloneDX 1.6: {str(error).splitlines()[0][:300]}")


def _model_card(f: Facts) -> dict:
    arch = f.version.manifest.get("architecture") or {}
    metrics = [{"type": m.type, "value": f"{m.value:.6g}", "slice": m.slice} for m in f.metrics]
    own = ", ".join(d.name for d in f.own_datasets) or "its data"
    card = {
        "modelParameters": {
            "approach": {"type": "self-supervised"},
            "task": "text-generation",
            "architectureFamily": "transformer decoder",
            "modelArchitecture": str(arch.get("model_type") or arch.get("family") or "unknown"),
            "datasets": [{"ref": f"dataset:{d.id}"} for d in f.datasets],
            "inputs": [{"format": "text"}],
            "outputs": [{"format": "text"}],
        },
        "considerations": {
            "useCases": [f"text generation in the register of {own}"],
            "technicalLimitations": ["measured only by the metrics listed (held-out perplexity, evaluation suites)",
                                     "repeats the content and biases of its training data"],
        },
    }
    if metrics:
        card["quantitativeAnalysis"] = {"performanceMetrics": metrics}
    return card


def _data(d: DatasetFact) -> dict:
    counts = dict(d.counts)
    return {"type": "dataset", "name": d.name,
            "description": f"{counts.get('documents', 0)} documents ({counts.get('train_documents', 0)} train, "
                          f"{counts.get('test_documents', 0)} test); curation: {', '.join(d.steps) or 'none'}",
            "contents": {"properties": [{"name": "stemma:train-sha256", "value": d.manifest.get("train", "")},
                                        {"name": "stemma:test-sha256", "value": d.manifest.get("test", "")}]}}


def bom_files(doc: dict) -> dict[str, str]:
    """File path -> sha256 of every file component of a BOM (what `stemma verify` compares with the directory)."""
    out = {}
    for comp in doc.get("components", []):
        if comp.get("type") == "file":
            hashes = {h["alg"]: h["content"] for h in comp.get("hashes", [])}
            out[comp["name"]] = hashes.get("SHA-256", "")
    return out
