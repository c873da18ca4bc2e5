"""``choice``: multiple choice by the log-likelihood of each choice given the prompt.

As lm-evaluation-harness scores ``multiple_choice`` tasks (Gao et al., 2021; the method of the GPT-3 paper, Brown
et al., 2020): the model picks the choice whose tokens, appended to the prompt after a delimiter, have the highest
summed log-probability (``accuracy``, lm-eval's ``acc``), or the highest per character of the choice
(``accuracy_norm``, lm-eval's ``acc_norm``, which does not favour short choices). No text is generated.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import Result, Task, TaskConfig, register


@dataclass(frozen=True)
class ChoiceConfig(TaskConfig):
    """Multiple choice by log-likelihood."""

    delimiter: str = " "
    """Put between the prompt and each choice (lm-eval's ``target_delimiter``)."""


@register
class Choice(Task):
    """Rows ``{"prompt": ..., "choices": [...], "answer": index}``."""

    kind = "choice"
    config_cls = ChoiceConfig
    fields = {"prompt": str, "choices": list, "answer": int}
    metrics = {"accuracy": True, "accuracy_norm": True}

    @classmethod
    def check_row(cls, row) -> str | None:
        choices = row["choices"]
        if len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            return "choices must be a list of two or more non-empty strings"
        if not 0 <= row["answer"] < len(choices):
            return f"answer {row['answer']} is not an index of its {len(choices)} choices"
        return None

    def score(self, runner) -> Result:
        d = self.config.delimiter
        pairs = [(r["prompt"], d + c) for r in self.rows for c in r["choices"]]
        ll = runner.loglik(pairs)
        right = right_norm = 0
        i = 0
        margins = []
        for r in self.rows:
            n = len(r["choices"])
            scores = ll[i : i + n]
            i += n
            norm = [s / len(c) for s, c in zip(scores, r["choices"])]
            right += max(range(n), key=scores.__getitem__) == r["answer"]
            right_norm += max(range(n), key=norm.__getitem__) == r["answer"]
            margins.append(scores[r["answer"]] - max(s for j, s in enumerate(scores) if j != r["answer"]))
        rows = len(self.rows)
        return Result({"accuracy": right / rows, "accuracy_norm": right_norm / rows},
                      {"rows": rows, "right": right, "right_norm": right_norm,
                       "mean_margin": sum(margins) / rows})
