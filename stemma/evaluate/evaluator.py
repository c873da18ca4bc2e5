"""The one evaluator: perplexity of a registered version (memoised as a metric) or of a model in memory.

`stemma build` asks it for each version's numbers, the update gate for a candidate's before/after, the selector
for stored numbers only (``measure=False``: the server never evaluates inside a request).
"""

from __future__ import annotations

import torch

from ..progress import NullReporter, Reporter
from .perplexity import perplexity

GGUF_PPL = "perplexity.llamacpp."
"""Metric name prefix of a GGUF's perplexity in llama.cpp (then the type: f32, f16, q8_0)."""


class _LlamaLM:
    """A llama.cpp model seen as a causal LM by `perplexity`: each row's logits at every position."""

    def __init__(self, llm):
        self.llm = llm

    def eval(self):
        return self

    def __call__(self, input_ids: torch.Tensor):
        from types import SimpleNamespace

        rows = []
        for row in input_ids.tolist():
            self.llm.reset()
            self.llm.eval(row)
            rows.append(torch.from_numpy(self.llm.scores[: len(row)].copy()))
        return SimpleNamespace(logits=torch.stack(rows))


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

    def stored_gguf(self, v, dataset_id: str, fmt: str, split: str = "test") -> float | None:
        return self.ws.get_metric(v.id, GGUF_PPL + fmt, dataset_id, split)

    def gguf_ppls(self, v, dataset_id: str, fmts, split: str = "test") -> dict[str, float]:
        """The perplexity of the version's GGUF of each type in ``fmts`` (f32, f16, q8_0): the stored ones, the
        others measured (`gguf_measure`) on files written once to a temporary directory."""
        from ..footprint import gguf_files

        got = {f: self.stored_gguf(v, dataset_id, f, split) for f in fmts}
        todo = tuple(f for f, x in got.items() if x is None)
        if todo:
            with gguf_files(self.ws, v, todo) as files:
                got.update(self.gguf_measure(v, dataset_id, files, split))
        return got

    def gguf_measure(self, v, dataset_id: str, files: dict, split: str = "test") -> dict[str, float]:
        """Measure and store the perplexity of each written GGUF in ``files`` (type -> path, as
        `stemma.footprint.gguf_files` hands them), run by llama.cpp on the same windows of the same token stream as
        `ppl`, as ``perplexity.llamacpp.<type>``."""
        from ..footprint import open_gguf

        got: dict[str, float] = {}
        if not files:
            return got
        ids = self.ids(v.row.tokenizer, dataset_id, split)
        context = int((v.manifest.get("architecture") or {}).get("context") or 0)
        for fmt, path in files.items():
            llm = open_gguf(path, n_ctx=context, n_batch=max(512, context), logits_all=True)
            lm = _LlamaLM(llm)
            got[fmt] = perplexity(lm, ids, context or llm.n_ctx(), max_tokens=self.max_tokens,
                                  reporter=self.reporter, label=f"{v.row.node_path}: {fmt} GGUF perplexity")
            llm.close()
            self.ws.put_metric(v.id, GGUF_PPL + fmt, dataset_id, split, got[fmt],
                               details={"max_tokens": self.max_tokens, "runtime": "llamacpp"})
        return got

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
