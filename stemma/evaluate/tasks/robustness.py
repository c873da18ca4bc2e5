"""``robustness``: another task's score when its prompts carry typos, odd case, odd whitespace or swapped words.

Perturbations in the manner of NL-Augmenter (Dhole et al., 2021) and the noise tests of Belinkov & Bisk (2018),
"Synthetic and Natural Noise Both Break Neural Machine Translation" (ICLR): character-level (``typo``: a letter
swapped with its neighbour, dropped, doubled or replaced by a key next to it on a QWERTY keyboard; ``whitespace``:
a space doubled or removed) and word-level (``case``: a word upper-cased, lower-cased or capitalised; ``swap``: two
neighbouring words exchanged). Each kind hits each word (or space) with probability ``rate``, from a generator seeded
by (seed, kind, row), so a task's perturbed prompts never change. The inner task is scored once per kind; the drop
of a kind is how much worse the score gets (clean minus perturbed for a score where higher is better, the other
way round for one where lower is), and the metric is the largest drop.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .base import Result, Task, register

KINDS = ("typo", "case", "whitespace", "swap")
_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]
_NEIGHBOURS = {c: "".join(r[j] for j in (i - 1, i + 1) if 0 <= j < len(r)) for r in _ROWS for i, c in enumerate(r)}
_WORD = re.compile(r"\S+")


def _typo(word: str, rng: random.Random) -> str:
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    if len(letters) < 3:
        return word
    i = rng.choice(letters[:-1])
    op = rng.randrange(4)
    if op == 0 and word[i + 1].isalpha():  # swap with the next letter
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if op == 1:  # drop
        return word[:i] + word[i + 1:]
    if op == 2:  # double
        return word[:i] + word[i] + word[i:]
    near = _NEIGHBOURS.get(word[i].lower())
    if not near:
        return word
    c = rng.choice(near)
    return word[:i] + (c.upper() if word[i].isupper() else c) + word[i + 1:]


def perturb(text: str, kind: str, rate: float, rng: random.Random) -> str:
    """``text`` with perturbations of one kind (see the module docstring); line structure is kept."""
    if kind == "whitespace":
        return re.sub(r"(?<=\S) (?=\S)", lambda m: m.group(0) if rng.random() >= rate else rng.choice(["  ", ""]),
                      text)
    if kind == "swap":
        spans = [m.span() for m in re.finditer(r"[^\W\d_]+", text)]
        out, last, i = [], 0, 0
        while i + 1 < len(spans):
            (a0, a1), (b0, b1) = spans[i], spans[i + 1]
            if text[a1:b0] == " " and rng.random() < rate:
                out += [text[last:a0], text[b0:b1], " ", text[a0:a1]]
                last, i = b1, i + 2
            else:
                i += 1
        return "".join(out) + text[last:]

    def one(m: re.Match) -> str:
        w = m.group(0)
        if rng.random() >= rate:
            return w
        if kind == "typo":
            return _typo(w, rng)
        return rng.choice([w.upper(), w.lower(), w.capitalize()])

    return _WORD.sub(one, text)


@dataclass(frozen=True)
class RobustnessConfig:
    """Which task to perturb, how, and which of its metrics to compare."""

    task: str = ""
    """Id of the task whose prompts are perturbed (declared in some suite of the same stemma.yaml)."""
    metric: str = ""
    """The inner task's metric to compare; empty: its headline metric (the first its kind reports)."""
    perturbations: tuple[str, ...] = KINDS
    """Kinds to apply, each scored separately: typo, case, whitespace, swap."""
    rate: float = 0.1
    """Probability that a word (a space, for whitespace) is perturbed."""
    seed: int = 0
    """Seed of the perturbations."""


@register
class Robustness(Task):
    """No task file: it perturbs the prompts of the task named in ``config.task``."""

    kind = "robustness"
    config_cls = RobustnessConfig
    metrics = {"drop": False}
    prompt_field = None
    needs_file = False

    @classmethod
    def check_config(cls, cfg: RobustnessConfig) -> str | None:
        if not cfg.task:
            return "kind robustness needs config.task (the id of the task to perturb)"
        bad = sorted(set(cfg.perturbations) - set(KINDS))
        if bad or not cfg.perturbations:
            return f"unknown perturbations {bad} (known: {', '.join(KINDS)})"
        if not 0 < cfg.rate <= 1:
            return "rate must be in (0, 1]"
        return None

    @property
    def inner_metric(self) -> str:
        return self.config.metric or next(iter(self.spec.inner.metrics))

    @property
    def max_new_tokens(self) -> int:
        return self.spec.inner.task().max_new_tokens

    def texts(self) -> list[str]:
        return self.spec.inner.task().texts()

    def examples(self) -> list[dict]:
        inner = self.spec.inner.task()
        return [{"perturbation": k, **r} for k in self.config.perturbations for r in self.variant(inner, k).rows]

    def variant(self, inner: Task, kind: str) -> Task:
        cfg = self.config
        return inner.perturbed(lambda text, i: perturb(text, kind, cfg.rate, random.Random(f"{cfg.seed}:{kind}:{i}")))

    def score(self, runner) -> Result:
        inner = self.spec.inner
        metric = self.inner_metric
        higher = inner.metrics[metric]
        clean = runner.score(inner)[metric]  # memoised with the inner task's own scores
        scores, drops = {}, {}
        for kind in self.config.perturbations:
            scores[kind] = self.variant(inner.task(), kind).score(runner).metrics[metric]
            drops[kind] = (clean - scores[kind]) if higher else (scores[kind] - clean)
        worst = max(drops, key=drops.__getitem__)
        return Result({"drop": drops[worst]},
                      {"task": inner.id, "metric": metric, "clean": clean, "perturbed": scores, "drops": drops,
                       "worst": worst, "rate": self.config.rate, "seed": self.config.seed})
