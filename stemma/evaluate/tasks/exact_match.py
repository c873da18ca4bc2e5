"""``exact_match``: short answers, right when the greedy continuation is the answer (after trimming)."""

from __future__ import annotations

import string
from dataclasses import dataclass

from .base import GenerateConfig, Result, Task, register
from .generation import _examples


@dataclass(frozen=True)
class AnswerConfig(GenerateConfig):
    """A short answer: the continuation up to the first stop string, compared with the row's answer."""

    max_new_tokens: int = 16
    """New tokens per prompt at most (answers are short)."""
    ignore_case: bool = False
    """Compare case-insensitively."""
    ignore_punctuation: bool = False
    """Drop ASCII punctuation from both sides before comparing."""


def normalise(text: str, cfg: AnswerConfig) -> str:
    text = " ".join(text.split())
    if cfg.ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    return text.lower() if cfg.ignore_case else text


@register
class ExactMatch(Task):
    """Rows ``{"prompt": ..., "answer": ...}``: the share of prompts whose continuation equals the answer."""

    kind = "exact_match"
    config_cls = AnswerConfig
    fields = {"prompt": str, "answer": str}
    metrics = {"exact_match": True}

    def right(self, output: str, answer: str) -> bool:
        return normalise(output, self.config) == normalise(answer, self.config)

    def score(self, runner) -> Result:
        cfg = self.config
        outputs = runner.generate([r["prompt"] for r in self.rows], cfg.max_new_tokens, cfg.stop)
        hits = [self.right(o, r["answer"]) for o, r in zip(outputs, self.rows)]
        metric = next(iter(self.metrics))
        return Result({metric: sum(hits) / len(hits)},
                      {"rows": len(hits), "right": sum(hits), "examples": _examples(self.rows, outputs)})
