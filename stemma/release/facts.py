"""What a release says about its version, gathered once from the registry: the model card and the ML-BOM both
write these facts, so the two never disagree."""

from __future__ import annotations

from dataclasses import dataclass

from ..licenses import Licensing
from ..workspace import VersionInfo, Workspace

# Hugging Face's base_model_relation words (https://huggingface.co/docs/hub/model-cards#specifying-a-base-model).
HF_RELATION = {"adapter": "adapter", "quantized": "quantized", "merge": "merge"}
"""stemma relation -> Hugging Face relation where they differ from ``finetune`` (distill, pruned, lowrank, update and
finetune are all further training or reshaping of the base's weights)."""


@dataclass(frozen=True)
class DatasetFact:
    id: str
    name: str
    seq: int
    role: str
    """``train`` or ``replay``."""
    version: str
    """``node@version`` that took it in."""
    license: str | None
    licenses: tuple[tuple[str, int], ...]
    """(licence expression, documents) from the datasheet."""
    language: str | None
    domain: str | None
    counts: tuple[tuple[str, int], ...]
    """The datasheet's counts: documents, train and test documents, characters, tokens, bytes."""
    steps: tuple[str, ...]
    """Curation steps, in order."""
    manifest: dict


@dataclass(frozen=True)
class Metric:
    type: str
    """``perplexity`` or ``TASK/METRIC``."""
    value: float
    slice: str
    """What it was measured on: ``en-python (test)`` or the task."""


@dataclass(frozen=True)
class Facts:
    version: VersionInfo
    chain: tuple[VersionInfo, ...]
    """Master first, ending with the version."""
    layer: str
    format: str
    license: str | None
    """The release's licence (a pulled version's: the one its obligations imply, None when they imply none)."""
    licensing: Licensing
    datasets: tuple[DatasetFact, ...]
    metrics: tuple[Metric, ...]
    gate: tuple[str, ...]
    """The release gate's lines (empty: the node has no gate)."""
    signing_key: str | None
    """``sha256:<hex>`` of the signer's public key, as the card and the `releases` row record it (None: unsigned,
    a pulled version)."""

    @property
    def parent(self) -> VersionInfo | None:
        return self.chain[-2] if len(self.chain) > 1 else None

    @property
    def hf_relation(self) -> str | None:
        """The Hugging Face ``base_model_relation`` of the released files to their base model."""
        if self.parent is None:
            return None
        if self.format == "adapter":
            return "adapter"
        rel = self.version.row.relation
        return HF_RELATION.get(rel, "finetune") if rel != "adapter" else "finetune"  # hf/gguf: merged weights

    @property
    def own_datasets(self) -> tuple[DatasetFact, ...]:
        me = f"{self.version.row.node_path}@{self.version.short}"
        return tuple(d for d in self.datasets if d.version == me and d.role == "train")


def dataset_facts(ws: Workspace, chain: tuple[VersionInfo, ...]) -> tuple[DatasetFact, ...]:
    """Every dataset trained into a chain (master first), once each, with the version that first took it in."""
    datasets: list[DatasetFact] = []
    for c in chain:
        for role, ds_id in sorted(ws.version_datasets(c.id).items()):
            if any(d.id == ds_id for d in datasets):
                continue
            ds = ws.resolve_dataset(ds_id)
            sheet = ds.datasheet or {}
            datasets.append(DatasetFact(
                id=ds_id, name=ds.name, seq=ds.seq, role=role, version=f"{c.row.node_path}@{c.short}",
                license=ds.license, licenses=tuple((sheet.get("licenses") or {}).items()),
                language=ds.language, domain=sheet.get("domain"),
                counts=tuple((k, int(n)) for k, n in (sheet.get("counts") or {}).items() if isinstance(n, int)),
                steps=tuple(s.get("step", "?") for s in sheet.get("curation") or []),
                manifest=ws.dataset_manifest(ds_id)))
    return tuple(datasets)


def gather(ws: Workspace, v: VersionInfo, fmt: str, verdict, signing_key: str | None) -> Facts:
    """The facts of releasing ``v`` as ``fmt`` with ``verdict`` (`stemma.release.make.Verdict`: licence, gate
    lines and the obligations already computed for it)."""
    chain = tuple(ws.chain(v.id))
    datasets = dataset_facts(ws, chain)
    names = {d.id: d.name for d in datasets}
    metrics = []
    for m in ws.metrics_of(v.id):
        if m.name == "perplexity" and m.dataset_id:
            metrics.append(Metric("perplexity", m.value, f"{names.get(m.dataset_id, m.dataset_id[:12])} ({m.split})"))
        elif m.name.startswith(("task:", "harness:", "pref/")):
            metrics.append(Metric(m.name.removeprefix("task:"), m.value, m.name.split("/")[0]))
    n = ws.node(v.row.node_path)
    return Facts(version=v, chain=chain, layer=n.layer if n else "?", format=fmt, license=verdict.license,
                 licensing=verdict.licensing, datasets=datasets, metrics=tuple(metrics), gate=verdict.gate,
                 signing_key=signing_key)
