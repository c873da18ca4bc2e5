"""Helpers for the lm-evaluation-harness task YAMLs beside this file.

They read stemma's task rows (``{"prompt", "reference"}``) from a JSONL file in this directory, whatever the
working directory, and clean outputs and references the way stemma's ``generation`` task does before sacrebleu
scores them (``stemma/evaluate/tasks/generation.py``: ``normalize_whitespace``, on by default).
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(file, **_):
    """``custom_dataset``: the rows of ``file`` (beside this module) as the ``test`` split.

    lm-eval also passes the task's metadata as keyword arguments; they are not needed here.
    """
    import datasets

    with open(HERE / file, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def prompt(doc):
    """The prompt exactly as stored (a Jinja template would be rendered, and could change it)."""
    return doc["prompt"]


def reference(doc):
    return " ".join(doc["reference"].split())


def normalise(resps, docs):
    """A ``custom`` filter: runs of whitespace (wrapped lines, indentation) collapse to one space."""
    return [[" ".join(r.split()) for r in inst] for inst in resps]
