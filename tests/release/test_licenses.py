"""Licence obligations: SPDX identifiers classified by ScanCode's database, kept or dropped by a release licence,
carried down the lineage from datasets and imported checkpoints."""

from __future__ import annotations

import pytest
import yaml

from stemma.errors import StemmaError
from stemma.licenses import (
    ATTRIBUTION,
    COPYLEFT,
    NO_DERIVATIVES,
    NON_COMMERCIAL,
    REVIEW,
    USE_RESTRICTIONS,
    Licensing,
    Obligation,
    checkpoint_license,
    hf_to_spdx,
    keeps_copyleft,
    kinds_of,
    parse_release_license,
)


@pytest.mark.parametrize("key, kinds", [
    ("GPL-3.0-only", {COPYLEFT, ATTRIBUTION}), ("CC-BY-SA-4.0", {COPYLEFT, ATTRIBUTION}),
    ("MIT", {ATTRIBUTION}), ("PSF-2.0", {ATTRIBUTION}), ("CC0-1.0", set()),
    ("CC-BY-NC-4.0", {NON_COMMERCIAL, ATTRIBUTION}), ("CC-BY-NC-ND-4.0", {NON_COMMERCIAL, NO_DERIVATIVES, ATTRIBUTION}),
    ("LicenseRef-scancode-llama-2-license-2023", {USE_RESTRICTIONS, ATTRIBUTION}),
    ("LicenseRef-scancode-bigscience-open-rail-m", {USE_RESTRICTIONS, ATTRIBUTION}),
    ("verbatim-copying-permitted", {REVIEW}),
])
def test_kinds(key, kinds):
    assert set(kinds_of(key)) == kinds


@pytest.mark.parametrize("source, release, kept", [
    ("GPL-3.0-only", "GPL-3.0-or-later", True), ("GPL-3.0-only", "GPL-3.0-only", True),
    ("GPL-3.0-only", "MIT", False), ("GPL-3.0-only", "GPL-2.0-only", False),
    ("GPL-2.0-or-later", "GPL-3.0-only", True), ("GPL-2.0-only", "GPL-3.0-only", False),
    ("GPL-3.0-or-later", "GPL-2.0-or-later", False), ("LGPL-2.1-or-later", "GPL-3.0-only", True),
    ("CC-BY-SA-4.0", "GPL-3.0-only", True), ("GPL-3.0-only", "AGPL-3.0-only", True),
])
def test_keeps_copyleft(source, release, kept):
    assert keeps_copyleft(source, release) is kept


def _ob(lic, kinds, source="dataset d"):
    return Obligation(lic, kinds, source, "3 documents", ("a@1", "a/b@2"), lic)


def test_conflicts_name_the_chain_and_the_implied_licence():
    copyleft = (COPYLEFT, ATTRIBUTION)
    lic = Licensing("v", (_ob("GPL-3.0-only", copyleft), _ob("GPL-2.0-or-later", copyleft),
                          _ob("PSF-2.0", (ATTRIBUTION,)), _ob("odd", (REVIEW,))))
    [c] = [c for c in lic.conflicts("MIT") if c.startswith("GPL-3.0-only")]
    assert c == ("GPL-3.0-only from dataset d (trained into a@1 -> a/b@2) requires a copyleft licence (GPL-3.0); "
                 "MIT drops it")
    assert lic.conflicts("GPL-3.0-or-later") == []
    assert lic.conflicts("GPL-3.0-only AND MIT") == []
    assert any("choosing MIT" in c for c in lic.conflicts("MIT OR GPL-3.0-only"))
    assert lic.implied == "GPL-3.0-only"
    nc = Licensing("v", (_ob("CC-BY-NC-4.0", (NON_COMMERCIAL, ATTRIBUTION)), _ob("MIT", (ATTRIBUTION,))))
    assert "forbids commercial use" in nc.conflicts("MIT")[0]
    assert nc.conflicts("CC-BY-NC-SA-4.0") == [] and nc.implied == "CC-BY-NC-4.0"
    twice = Licensing("v", (_ob("GPL-3.0-only", copyleft), _ob("GPL-3.0-only", copyleft, "dataset e")))
    assert twice.conflicts("MIT") == ["GPL-3.0-only from dataset d (trained into a@1 -> a/b@2) and dataset e (trained "
                                      "into a@1 -> a/b@2) requires a copyleft licence (GPL-3.0); MIT drops it"]
    # Copyleft forbids further restrictions: adding a non-commercial licence beside it drops it.
    mixed = Licensing("v", (_ob("GPL-3.0-only", copyleft), _ob("CC-BY-NC-4.0", (NON_COMMERCIAL, ATTRIBUTION))))
    [c] = mixed.conflicts("GPL-3.0-only AND CC-BY-NC-4.0")
    assert c.startswith("GPL-3.0-only from dataset d") and mixed.implied is None
    ncsa = Licensing("v", (_ob("CC-BY-NC-SA-4.0", tuple(kinds_of("CC-BY-NC-SA-4.0"))),))
    assert COPYLEFT in ncsa.obligations[0].kinds and NON_COMMERCIAL in ncsa.obligations[0].kinds
    assert ncsa.conflicts("CC-BY-NC-SA-4.0") == []  # a copyleft licence may carry the restriction itself
    both = Licensing("v", (_ob("MIT", (ATTRIBUTION,)), _ob("BSD-3-Clause", (ATTRIBUTION,))))
    assert both.implied is None and both.conflicts("Apache-2.0") == []


def test_release_licence_must_be_spdx():
    assert parse_release_license("gpl-3.0+ AND mit") == "GPL-3.0-or-later AND MIT"
    assert parse_release_license("LicenseRef-mine") == "LicenseRef-mine"
    for bad in ("MIT AND", "Frobnicate-1.0"):
        with pytest.raises(StemmaError):
            parse_release_license(bad)


def test_checkpoint_licence_from_readme_or_license_text(tmp_path):
    assert checkpoint_license(tmp_path) is None
    (tmp_path / "LICENSE").write_text(
        "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
        "associated documentation files ... The above copyright notice and this permission notice shall be "
        "included in all copies or substantial portions of the Software.")
    assert checkpoint_license(tmp_path) == {"license": "MIT", "file": "LICENSE"}
    (tmp_path / "README.md").write_text("---\nlicense: llama2\n---\n# a model\n")
    assert checkpoint_license(tmp_path) == {"license": "LicenseRef-scancode-llama-2-license-2023",
                                            "file": "README.md"}
    assert hf_to_spdx("apache-2.0") == "Apache-2.0" and hf_to_spdx("openrail") == "LicenseRef-hf-openrail"
    assert set(kinds_of(hf_to_spdx("openrail"))) == {USE_RESTRICTIONS, ATTRIBUTION}


def test_an_imported_masters_licences_reach_its_children(ws, tmp_path):
    from stemma.build import build
    from stemma.licenses import licensing
    from stemma.spec import load_spec
    from tests.test_import import _checkpoint, _spec

    ckpt = tmp_path / "ckpt"
    _checkpoint(ckpt)
    (ckpt / "README.md").write_text("---\nlicense: llama2\n---\n")
    spec = _spec(tmp_path, ckpt)
    raw = yaml.safe_load(spec.read_text())
    raw["nodes"]["master"]["config"]["license"] = "Apache-2.0"
    spec.write_text(yaml.safe_dump(raw))
    build(ws, load_spec(spec))
    master, en = ws.resolve_version("master"), ws.resolve_version("en")
    lic = licensing(ws, en.id)
    by = {o.license: o for o in lic.obligations}
    llama = by["LicenseRef-scancode-llama-2-license-2023"]
    assert llama.source == "checkpoint of master" and llama.detail == "README.md"
    assert llama.chain == (f"master@{master.short}", f"en@{en.short}")
    assert by["Apache-2.0"].detail == "declared in the import config"
    [c] = [c for c in lic.conflicts("GPL-3.0-or-later") if "llama" in c]
    assert "imported as master@" in c and "use restrictions" in c

    raw["nodes"]["master"]["config"]["license"] = "Not A Licence"
    spec.write_text(yaml.safe_dump(raw))
    with pytest.raises(StemmaError, match="import config license: .*unknown SPDX identifier"):
        build(ws, load_spec(spec))


def test_a_licence_only_detected_in_texts_is_for_review_not_an_obligation():
    from types import SimpleNamespace

    from stemma.licenses import _dataset_sources

    ds = SimpleNamespace(name="legal", datasheet={
        "licenses": {"verbatim-copying-permitted": 14, "PSF-2.0": 1},
        "curation": [{"step": "license", "kinds": {"license:GPL-2.0-only": 1, "license:PSF-2.0": 1}}]})
    sources, notes = _dataset_sources(ds)
    by = {lic: (detail, declared) for lic, detail, declared in sources}
    assert by["GPL-2.0-only"] == ("detected in 1 documents", False)  # the GPL's own text, declared for nothing
    assert by["PSF-2.0"] == ("1 documents, detected in 1 documents", True)
    assert by["verbatim-copying-permitted"] == ("14 documents", True) and notes == []
