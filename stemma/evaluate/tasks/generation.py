"""``generation``: greedy continuations of prompts scored against references with sacrebleu (BLEU and chrF).

Corpus-level BLEU (Papineni et al., 2002) and chrF (Popović, 2015) as sacrebleu computes them (Post, 2018,
"A Call for Clarity in Reporting BLEU Scores"): its default tokenisation and smoothing, so a score can be compared
with any other sacrebleu score that has the same signature. The signature strings are kept with the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import StemmaError
from .base import GenerateConfig, Result, Task, register


def sacrebleu_metrics(word_order: int = 0, lowercase: bool = False):
    """sacrebleu's BLEU and chrF objects (imported lazily: an optional dependency of evaluation only)."""
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise StemmaError("generation tasks need the package sacrebleu: pip install sacrebleu") from None
    return BLEU(lowercase=lowercase), CHRF(word_order=word_order, lowercase=lowercase)


def clean(text: str, normalize_whitespace: bool) -> str:
    return " ".join(text.split()) if normalize_whitespace else text.strip()


@dataclass(frozen=True)
class GenerationConfig(GenerateConfig):
    """Generation scored with sacrebleu."""

    normalize_whitespace: bool = True
    """Collapse runs of whitespace (line breaks and indentation of wrapped text) in outputs and references."""
    chrf_word_order: int = 0
    """chrF's word n-gram order: 0 is chrF, 2 is chrF++ (Popović, 2017)."""
    lowercase: bool = False
    """Compare case-insensitively (sacrebleu's ``lowercase``; it shows in the signature)."""


@register
class Generation(Task):
    """Rows ``{"prompt": ..., "reference": ...}``: the continuation of each prompt against its reference."""

    kind = "generation"
    config_cls = GenerationConfig
    fields = {"prompt": str, "reference": str}
    metrics = {"chrf": True, "bleu": True}

    @classmethod
    def check_config(cls, cfg: GenerationConfig) -> str | None:
        return None if cfg.chrf_word_order in (0, 1, 2) else "chrf_word_order must be 0, 1 or 2"

    def score(self, runner) -> Result:
        cfg = self.config
        outputs = runner.generate([r["prompt"] for r in self.rows], cfg.max_new_tokens, cfg.stop)
        hyps = [clean(o, cfg.normalize_whitespace) for o in outputs]
        refs = [clean(r["reference"], cfg.normalize_whitespace) for r in self.rows]
        bleu, chrf = sacrebleu_metrics(cfg.chrf_word_order, cfg.lowercase)
        b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
        return Result({"chrf": float(c.score), "bleu": float(b.score)},
                      {"bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
                       "rows": len(hyps), "examples": _examples(self.rows, hyps)})


def _examples(rows, outputs, n: int = 3) -> list[dict]:
    return [{"prompt": r["prompt"][-120:], "output": o[:160], "expected": r.get("reference", r.get("answer", ""))[:160]}
            for r, o in zip(rows[:n], outputs)]
