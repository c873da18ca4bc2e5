"""Model card metadata: Hugging Face licence ids and base_model_relation words."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from stemma.licenses import Licensing
from stemma.release.card import hf_license
from stemma.release.facts import Facts


@pytest.mark.parametrize("expression, meta", [
    ("MIT", {"license": "mit"}), ("GPL-3.0-only", {"license": "gpl-3.0"}), ("Apache-2.0", {"license": "apache-2.0"}),
    ("GPL-3.0-or-later", {"license": "other", "license_name": "gpl-3.0-or-later"}),
    ("GPL-3.0-or-later AND MIT", {"license": "other", "license_name": "gpl-3.0-or-later-and-mit"}),
])
def test_hf_license(expression, meta):
    assert hf_license(expression) == {**meta, "license_expression": expression}


def _facts(relation: str, fmt: str, parent: bool = True) -> Facts:
    v = SimpleNamespace(row=SimpleNamespace(relation=relation))
    chain = (SimpleNamespace(), v) if parent else (v,)
    return Facts(version=v, chain=chain, layer="device", format=fmt, license="MIT", licensing=Licensing("v", ()),
                 datasets=(), metrics=(), gate=(), signing_key="sha256:0")


@pytest.mark.parametrize("relation, fmt, hf", [
    ("adapter", "adapter", "adapter"), ("adapter", "hf", "finetune"), ("quantized", "gguf", "quantized"),
    ("quantized", "hf", "quantized"), ("distill", "hf", "finetune"), ("finetune", "gguf", "finetune"),
    ("update", "hf", "finetune"), ("merge", "hf", "merge"),
])
def test_base_model_relation(relation, fmt, hf):
    assert _facts(relation, fmt).hf_relation == hf
    assert _facts(relation, fmt, parent=False).hf_relation is None
