"""``perplexity``: the version's perplexity on the task file's texts, through the tree's one perplexity code."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Result, Task, TaskConfig, register


@dataclass(frozen=True)
class PerplexityConfig(TaskConfig):
    """Perplexity on a small shipped text set (the tree's own test splits are measured by every build anyway)."""

    max_tokens: int = 16384
    """Tokens evaluated at most; past this the context windows are spread evenly over the texts."""


@register
class Perplexity(Task):
    """Rows ``{"text": ...}``: joined with end-of-text tokens and cut into windows of the model's context
    (`stemma.evaluate.perplexity`), exactly as the tree's dataset perplexities are."""

    kind = "perplexity"
    config_cls = PerplexityConfig
    fields = {"text": str}
    metrics = {"perplexity": False}
    prompt_field = "text"

    @classmethod
    def check_config(cls, cfg: PerplexityConfig) -> str | None:
        return "max_tokens must be >= 16" if cfg.max_tokens < 16 else None

    def score(self, runner) -> Result:
        texts = [r["text"] for r in self.rows]
        value, tokens = runner.perplexity(texts, self.config.max_tokens)
        return Result({"perplexity": value}, {"texts": len(texts), "tokens": tokens})
