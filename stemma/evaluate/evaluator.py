"""The one evaluator: perplexity of a registered version (memoised as a metric) or of a model in memory.

`stemma build` asks it for each version's numbers, the update gate for a candidate's before/after, the selector
for stored numbers only (``measure=False``: the server never evaluates inside a request).
"""

from __future__ import annotations

import torch

from ..progress import NullReporter, Reporter
from .perplexity import perplexity


class Evaluator:
    """Perplexity per (version, dataset, split), memoised in the registry; token ids cached per tokenizer."""

    def __init__(self, ws, reporter: Reporter | None = None, max_tokens: int = 32768):
        self.ws, self.reporter, self.max_tokens = ws, reporter or NullReporter(), max_tokens
        self._models: dict[str, object] = {}
        self._ids: dict[tuple[str, str, str], torch.Tensor] = {}

    def _model(self, vid: str):
        if vid not in self._models:
            if len(self._models) >= 2:
                self._models.pop(next(iter(self._models)))
            self._models[vid] = self.ws.load_model(vid)
        return self._models[vid]

    def ids(self, tokenizer: str, dataset_id: str, split: str = "test") -> torch.Tensor:
        """A dataset split as one token stream of the tokenizer with digest ``tokenizer``."""
        from ..train.base import encode_corpus

        key = (tokenizer, dataset_id, split)
        if key not in self._ids:
            self._ids[key] = encode_corpus(self.ws.tokenizer(tokenizer), self.ws.dataset_texts(dataset_id, split))
        return self._ids[key]

    def stored(self, v, dataset_id: str, split: str = "test") -> float | None:
        return self.ws.get_metric(v.id, "perplexity", dataset_id, split)

    def ppl(self, v, dataset_id: str, split: str = "test") -> float:
        """The version's perplexity on a dataset split, measured once and stored."""
        got = self.stored(v, dataset_id, split)
        if got is not None:
            return got
        value = self.model_ppl(self._model(v.id), self.ids(v.row.tokenizer, dataset_id, split),
                               f"{v.row.node_path}: perplexity on {dataset_id[:8]}/{split}")
        self.ws.put_metric(v.id, "perplexity", dataset_id, split, value, details={"max_tokens": self.max_tokens})
        return value

    def model_ppl(self, model, ids: torch.Tensor, label: str = "perplexity") -> float:
        """Perplexity of a model in memory on token ids (not stored: the model need not be a version)."""
        from ..models.arch import model_context

        return perplexity(model, ids, model_context(model), max_tokens=self.max_tokens, reporter=self.reporter,
                          label=label)

    def evaluate_version(self, v) -> None:
        """Own split, parent's split, and the parent on the child's split (for the tree's comparisons)."""
        ds = self.ws.version_datasets(v.id)
        own = ds.get("train")
        if own:
            self.ppl(v, own)
        parent_id = self.ws.tree_parent_id(v.id)
        if parent_id:
            parent = self.ws.version(parent_id)
            pds = self.ws.version_datasets(parent.id).get("train")
            if pds:
                self.ppl(v, pds)
                self.ppl(parent, pds)
            if own:
                self.ppl(parent, own)
