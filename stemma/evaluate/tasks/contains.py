"""``contains``: short answers, right when the answer occurs anywhere in the greedy continuation."""

from __future__ import annotations

from .base import register
from .exact_match import ExactMatch, normalise


@register
class Contains(ExactMatch):
    """Rows ``{"prompt": ..., "answer": ...}``: the share of continuations that contain the answer."""

    kind = "contains"
    metrics = {"contains": True}

    def right(self, output: str, answer: str) -> bool:
        return normalise(answer, self.config) in normalise(output, self.config)
