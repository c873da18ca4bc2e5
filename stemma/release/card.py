"""The release's model card: a Hugging Face ``README.md`` with YAML metadata, from the release's `Facts`.

Metadata (https://huggingface.co/docs/hub/model-cards): ``license`` (a Hugging Face licence id when the release
licence is one plain SPDX id, else ``other`` with ``license_name``; ``license_expression`` keeps the SPDX
expression), ``base_model`` (``stemma:<parent version id>``: lineage is by content, not by a hub path),
``base_model_relation``, ``datasets`` (``stemma:<dataset id>``), ``metrics`` and ``model-index`` (perplexities on
held-out splits, evaluation-suite scores), ``obligations`` (the licence obligations along the lineage), and ``stemma``
(version, node, chain, the signing key's sha256). The body: intended use, limitations, metrics, lineage,
datasets, licence and obligations.
"""

from __future__ import annotations

import re

import yaml

from ..licenses import ATTRIBUTION, REVIEW, alternatives
from .facts import Facts


def hf_license(expression: str) -> dict:
    """``{"license": id}`` for one plain SPDX id (``MIT`` -> ``mit``, ``GPL-3.0-only`` -> ``gpl-3.0``), else
    ``{"license": "other", "license_name": slug}``; both with ``license_expression``."""
    alts = alternatives(expression) or []
    if len(alts) == 1 and len(alts[0]) == 1:
        key = next(iter(alts[0]))
        if not key.endswith(("-or-later", "+")) and not key.startswith("LicenseRef-"):
            return {"license": key.lower().removesuffix("-only"), "license_expression": expression}
    slug = re.sub(r"[^a-z0-9.]+", "-", expression.lower()).strip("-")
    return {"license": "other", "license_name": slug, "license_expression": expression}


def metadata(f: Facts) -> dict:
    v = f.version
    results = [{"task": {"type": "text-generation"}, "dataset": {"name": m.slice, "type": "stemma"},
                "metrics": [{"type": m.type, "value": round(m.value, 4)}]} for m in f.metrics]
    meta = {
        **(hf_license(f.license) if f.license else {"license": "other"}),
        "library_name": "gguf" if f.format == "gguf" else ("peft" if f.format == "adapter" else "transformers"),
        "pipeline_tag": "text-generation",
        "tags": ["stemma", v.row.relation, v.row.method, f.layer],
        "datasets": [f"stemma:{d.id}" for d in f.datasets],
        "metrics": sorted({m.type.split("/")[-1] for m in f.metrics}),
        "model-index": [{"name": v.row.node_path, "results": results}],
        "obligations": [{"license": o.license, "kinds": list(o.kinds), "from": o.carried}
                        for o in f.licensing.obligations],
        "stemma": {"version": v.id, "node": v.row.node_path, "format": f.format,
                   **({"signing_key": f.signing_key} if f.signing_key else {}),
                   "chain": [{"node": c.row.node_path, "version": c.id, "relation": c.row.relation} for c in f.chain]},
    }
    if f.parent is not None:
        meta["base_model"] = f"stemma:{f.parent.id}"
        meta["base_model_relation"] = f.hf_relation
    return meta


def render(f: Facts, meta: dict) -> str:
    v = f.version
    langs = sorted({d.language for d in f.datasets if d.language}) or ["unrecorded languages"]
    own = f.own_datasets or f.datasets
    focus = ", ".join(f"{d.name} ({d.domain or d.language or 'general'})" for d in own) or "no dataset of its own"
    docs = sum(dict(d.counts).get("documents", 0) for d in f.datasets)
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# {v.row.node_path} ({v.short})", "",
             f"A `{v.row.method}` version ({v.row.relation}) of the `{v.row.node_path}` node ({f.layer} layer) of a "
             f"stemma tree, {'released' if f.signing_key else 'exported'} as `{f.format}`"
             + (f" under `{f.license}`." if f.license else ": its lineage's licences imply no single licence (below)."),
             "",
             "## Intended use", "",
             f"Text generation and scoring in the register of its training data: {focus}; languages: "
             f"{', '.join(langs)}. A plain-text language model" +
             (" tuned on instruction or preference pairs." if v.row.method in ("sft", "dpo") else
              ", not an instruction-following assistant.") +
             " A base for further specialisation within its tree (children, device variants).", "",
             "## Limitations", "",
             f"- Its lineage was trained on {len(f.datasets)} datasets ({docs} documents, counted per dataset): it "
             "knows what they contain and repeats their biases and errors; it is not a source of facts.",
             "- Measured only as listed below (perplexity on held-out test splits, the node's evaluation suites);"
             " anything else is unmeasured.",
             f"- Release gate: {'; '.join(f.gate) if f.gate else 'none declared for this node'}.", "",
             "## Metrics", "", "| metric | on | value |", "|---|---|---|"]
    lines += [f"| {m.type} | {m.slice} | {m.value:.4g} |" for m in f.metrics] or ["| - | - | - |"]
    lines += ["", "## Lineage (content-addressed)", ""]
    lines += [f"- `{c.row.node_path}` `{c.id}` ({c.row.relation}, {c.row.method})" for c in f.chain]
    lines += ["", "## Datasets", ""]
    for d in f.datasets:
        lic = ", ".join(f"{e} ({n})" for e, n in d.licenses) or d.license or "not recorded"
        lines.append(f"- `{d.name}@{d.seq}` `{d.id}` ({d.role} of {d.version}): {dict(d.counts).get('documents', 0)} "
                     f"documents; licences {lic}; curation: {', '.join(d.steps) or 'none'}")
    lines += ["", "## Licence and obligations", "",
              (f"Licensed `{f.license}`. " if f.license else "") +
              "Licences reach this model through its data and checkpoints:", ""]
    for o in f.licensing.obligations:
        kinds = ", ".join(o.kinds) or "no obligation"
        lines.append(f"- `{o.license}` ({kinds}) from {o.carried}: {o.detail}")
    notices = sorted({o.license for o in f.licensing.obligations if ATTRIBUTION in o.kinds})
    if notices:
        lines += ["", f"Attribution: this model derives from material under {', '.join(notices)}; their notices "
                  "are those of the sources listed in the datasets' datasheets."]
    review = sorted({o.license for o in f.licensing.of_kind(REVIEW)})
    if review:
        lines += ["", f"Not judged (not SPDX or unknown to the licence database): {', '.join(review)}; review them."]
    lines += [f"- {n}" for n in f.licensing.notes]
    if f.signing_key:
        lines += ["", "## Verification", "",
                  "`model.sig` signs every file of this directory (OpenSSF model signing, key method); `bom.cdx.json` "
                  "is its CycloneDX 1.6 ML-BOM. `stemma verify DIR --public-key KEY` checks both."]
    return "\n".join(lines) + "\n"
