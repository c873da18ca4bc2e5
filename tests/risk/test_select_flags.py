"""The selector never chooses a version a risk flag reaches: it is left out with the flag as the reason."""

from __future__ import annotations

import pytest

from stemma import risk
from stemma.errors import StemmaError
from stemma.select import select


def test_flagged_candidates_are_left_out_with_the_flag(tree_copy):
    ws = tree_copy["ws"]
    before = select(ws, "en", "software/python", measure=False)
    assert before.choice.node == "en/software/python" and not any("flag" in s for s in before.skipped)
    info = risk.flag(ws, "version:en/software/python", reason="backdoor", severity="critical", by="alice")
    after = select(ws, "en", "software/python", measure=False)
    assert after.choice.node != "en/software/python"
    assert "en/software/python" not in {c.node for c in after.ranked}
    assert any(s.startswith("en/software/python") and info.label in s for s in after.skipped)
    assert select(ws, "en", "software/python", measure=False, flags={}).choice.node == "en/software/python"
    risk.flag(ws, "dataset:en", reason="poisoned", severity="high", by="alice")
    with pytest.raises(StemmaError, match="no candidate for en/software/python can be chosen: .*poisoned"):
        select(ws, "en", "software/python", measure=False)
