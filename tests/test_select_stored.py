"""The server's `model: auto` ranks from stored measurements only: nothing is measured or evaluated in a request."""

import pytest
from sqlalchemy import delete

from stemma.errors import StemmaError
from stemma.registry.tables import Metric


def _forbid_measuring(monkeypatch):
    from stemma import footprint
    from stemma.evaluate.evaluator import Evaluator

    def boom(*a, **k):
        raise AssertionError("measured inside a request")

    monkeypatch.setattr(footprint, "measure", boom)
    monkeypatch.setattr(Evaluator, "model_ppl", boom)


def test_unmeasured_candidates_are_skipped_with_a_reason(variants, monkeypatch):
    from stemma.select import select
    from stemma.serve.selector import select as serve_select

    ws = variants["ws"]
    int8 = ws.resolve_version("en/software/python/int8")
    with ws.db.session() as s:  # as if the variant had been built without footprints
        s.execute(delete(Metric).where(Metric.version_id == int8.id, Metric.name.like("footprint.%")))
    _forbid_measuring(monkeypatch)
    sel = select(ws, "en", "software/python", memory_bytes=10**12, measure=False)
    assert "en/software/python/int8" not in {c.node for c in sel.ranked}
    assert any(s.startswith("en/software/python/int8") and "no stored footprint" in s for s in sel.skipped)
    chosen = serve_select(ws, language="en", domain="python", memory_bytes=10**12)
    assert "not considered: en/software/python/int8" in chosen.reason


def test_nothing_stored_is_a_clear_error_not_a_measurement(variants, monkeypatch):
    from stemma.select import select

    ws = variants["ws"]
    with ws.db.session() as s:
        s.execute(delete(Metric).where(Metric.name.like("footprint.%")))
    _forbid_measuring(monkeypatch)
    with pytest.raises(StemmaError, match="no candidate for en/software/python has stored measurements"):
        select(ws, "en", "software/python", latency_ms=1000.0, measure=False)
