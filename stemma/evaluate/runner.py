"""Running tasks on a registered version: batched greedy generation and log-likelihoods, memoised scores.

A `Runner` holds one version's model and tokenizer and answers the three questions a task kind asks, each for a
whole task in one call: continuations of many prompts (`Runner.generate`), log-likelihoods of many continuations
(`Runner.loglik`) and a perplexity (`Runner.perplexity`). Generation goes through the serving engine
(`stemma.serve.engine.Engine` over a `Decoder` of the merged model, stepped on this thread: every prompt in one
continuous batch, prefilled in chunks, one decode step for all rows); a version the engine cannot run (a compressed
variant stored in its own format) falls back to left-padded ``model.generate`` batches. Both are greedy.

`score_task` memoises a task's metrics per (version, task content) in the registry's ``metrics`` table: name
``task:<id>/<metric>``, no dataset, and the first 16 hex digits of the task definition's sha256 in ``split``.
`evaluate_version` does for tasks what `Evaluator.evaluate_version` does for perplexity: the node's own tasks, its
parent on them (the gain) and the node on its parent's tasks (the forgetting).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from ..errors import StemmaError
from ..progress import NullReporter, Reporter
from .tasks import TaskSpec


class Runner:
    """One version, ready to generate and score in batches.

    Args:
        ws: the workspace.
        version_id: the version to run.
        batch_size: rows decoded together (generation) or scored per forward (log-likelihoods).
        engine: generate with the serving engine (True), with ``model.generate`` (False), or whichever fits (None).
        label: name in progress bars and messages (default: ``node@short id``).
    """

    def __init__(self, ws, version_id: str, batch_size: int = 64, engine: bool | None = None,
                 label: str | None = None, reporter: Reporter | None = None):
        from ..models.tokenizer import eos_id

        self.ws, self.version_id, self.batch_size = ws, version_id, batch_size
        v = ws.version(version_id)
        self.label = label or v.label
        self.tok = ws.tokenizer(v.row.tokenizer)
        try:
            self.eos = eos_id(self.tok)
        except ValueError as e:
            raise StemmaError(f"{self.label}: cannot evaluate tasks: {e}") from None
        self.context = int((v.manifest.get("architecture") or {}).get("context") or 0)
        self.use_engine = engine
        self.reporter = reporter or NullReporter()
        self._model = None
        self._engine = None
        self.memo = None
        """``TaskSpec -> metrics``: how `score` reaches stored scores (set by `score_task`)."""
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "scored_tokens": 0, "truncated": 0, "seconds": 0.0}

    # ------------------------------------------------------------------ the model
    @property
    def model(self):
        if self._model is None:
            from ..models.arch import model_context

            self._model = self.ws.load_model(self.version_id)
            self.context = self.context or model_context(self._model)
        return self._model

    def _get_engine(self):
        """The serving engine over the merged model, or None when this version's layers are not plain linears."""
        if self._engine is None and self.use_engine is not False:
            from ..models import families
            from ..serve.decoder import Decoder
            from ..serve.engine import Engine

            if self.ws.plan(self.version_id).loader != "hf":
                if self.use_engine:
                    raise StemmaError(f"{self.label}: a compressed variant cannot run on the serving engine")
                self.use_engine = False
                return None
            model = self.model
            family = families.checked(model.config)
            shape = family.decoder_shape(model.config)
            decoder = Decoder(family.decoder_weights(model), shape, self.batch_size)

            def no_adapter(key):  # the model is merged: no row needs an adapter
                raise AssertionError(key)

            self._engine = Engine(self.label, decoder, self.tok, self.eos, no_adapter,
                                  max_prefill_tokens=self.batch_size * shape.context)
            self.context = shape.context
        return self._engine

    def encode(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ generation
    def _fit(self, ids: list[int], new: int) -> list[int]:
        """A prompt's last tokens, so that it and ``new`` generated tokens fit the context."""
        room = max(1, self.context - new)
        if len(ids) > room:
            self.stats["truncated"] += 1
            return ids[-room:]
        return ids or [self.eos]

    def generate(self, prompts: list[str], max_new_tokens: int, stop: tuple[str, ...] = ()) -> list[str]:
        """The greedy continuation of each prompt: at most ``max_new_tokens`` tokens, cut before the first stop
        string, ending at the end-of-text token."""
        t0 = time.perf_counter()
        engine = self._get_engine()
        encoded = [self._fit(ids, max_new_tokens) for ids in self.encode(prompts)]
        self.stats["prompt_tokens"] += sum(map(len, encoded))
        if engine is not None:
            outs = self._generate_engine(engine, encoded, max_new_tokens, tuple(stop))
        else:
            outs = self._generate_hf(encoded, max_new_tokens, tuple(stop))
        self.stats["seconds"] += time.perf_counter() - t0
        return outs

    def _generate_engine(self, engine, encoded: list[list[int]], max_new: int, stop: tuple[str, ...]) -> list[str]:
        from ..serve.engine import SamplingParams, Sequence

        params = SamplingParams(max_tokens=max_new, temperature=0.0, stop=stop)
        texts: list[str] = [""] * len(encoded)
        errors: list[str] = []

        def sink(i: int, ev) -> None:  # called by the engine on this thread (not streamed: once, at the end)
            if ev.error:
                errors.append(ev.error)
            elif ev.done:
                texts[i] = ev.text

        seqs = [Sequence(prompt=ids, params=params, adapter=(), sink=functools.partial(sink, i), stream=False)
                for i, ids in enumerate(encoded)]
        engine.submit(seqs)
        while engine.has_work():
            engine.step()
        if errors:
            raise StemmaError(f"{self.label}: generation failed: {errors[0]}")
        self.stats["generated_tokens"] += sum(len(s.generated) for s in seqs)
        return texts

    @torch.no_grad()
    def _generate_hf(self, encoded: list[list[int]], max_new: int, stop: tuple[str, ...]) -> list[str]:
        model = self.model
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths: little padding
        out: list[str] = [""] * len(encoded)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), self.eos, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every row's next token is at the same column
                ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                mask[r, width - len(encoded[i]):] = 1
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                 pad_token_id=self.eos, eos_token_id=self.eos)[:, width:]
            for r, i in enumerate(idx):
                row = gen[r].tolist()
                if self.eos in row:
                    row = row[: row.index(self.eos)]
                self.stats["generated_tokens"] += len(row)
                out[i] = cut_at_stop(self.decode(row), stop)
        return out

    # ------------------------------------------------------------------ scoring
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token ids of a context and its continuation as lm-evaluation-harness splits them: trailing spaces of
        the context move to the continuation, the whole is encoded at once, and the continuation is what follows
        the context's own tokens (so a merge across the boundary is not split apart)."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, ctx = self.encode([context + continuation, context])
        return ctx, whole[len(ctx):]

    @torch.no_grad()
    def loglik(self, pairs: list[tuple[str, str]]) -> list[float]:
        """Summed log-probability of each continuation given its context (one forward per batch, right-padded)."""
        t0 = time.perf_counter()
        model = self.model
        seqs = []
        for ctx, cont in pairs:
            c, x = self.encode_pair(ctx, cont)
            if not x:
                raise StemmaError(f"{self.label}: continuation {cont!r} encodes to no tokens")
            whole = ((c or [self.eos]) + x)[-(self.context + 1):]  # no context: the end-of-text token stands in
            seqs.append((whole, min(len(x), len(whole) - 1)))
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
        out = [0.0] * len(seqs)
        for b in range(0, len(order), self.batch_size):
            idx = order[b : b + self.batch_size]
            width = max(len(seqs[i][0]) for i in idx) - 1
            inp = torch.full((len(idx), width), self.eos, dtype=torch.long)
            for r, i in enumerate(idx):  # right padding: under the causal mask real tokens never see it
                inp[r, : len(seqs[i][0]) - 1] = torch.tensor(seqs[i][0][:-1])
            logp = torch.log_softmax(model(input_ids=inp).logits.float(), dim=-1)
            for r, i in enumerate(idx):
                whole, n = seqs[i]
                pos = torch.arange(len(whole) - 1 - n, len(whole) - 1)
                out[i] = float(logp[r, pos, torch.tensor(whole[-n:])].sum())
                self.stats["scored_tokens"] += len(whole)
        self.stats["seconds"] += time.perf_counter() - t0
        return out

    def perplexity(self, texts: list[str], max_tokens: int) -> tuple[float, int]:
        """Perplexity on texts joined with end-of-text tokens, as `stemma.evaluate.evaluator.Evaluator` measures it."""
        from ..train.base import encode_corpus
        from .evaluator import Evaluator

        t0 = time.perf_counter()
        ids = encode_corpus(self.tok, texts)
        value = Evaluator(self.ws, max_tokens=max_tokens).model_ppl(self.model, ids)
        n = min(int(ids.numel()), max_tokens)
        self.stats["scored_tokens"] += n
        self.stats["seconds"] += time.perf_counter() - t0
        return value, n

    def score(self, spec: TaskSpec) -> dict[str, float]:
        """A task's metrics on this version: stored ones when `memo` is set, else measured now."""
        if self.memo is not None:
            return self.memo(spec)
        return spec.task().score(self).metrics


def cut_at_stop(text: str, stop: tuple[str, ...]) -> str:
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(hits)] if hits else text


# ---------------------------------------------------------------------------------------------- checks and scores
def check_runnable(runner: Runner, spec: TaskSpec, node: str | None = None) -> None:
    """Refuse, in one line, a task this version's tokenizer cannot run: one that changes the task's text on the way
    through (a normaliser, unknown tokens), or a context too short for the task's generations."""
    task = spec.task()
    who = node or runner.label
    for text in task.texts():
        back = runner.decode(runner.encode([text])[0])
        if back != text:
            raise StemmaError(f"task {spec.id} cannot run on {who}: its tokenizer turns {text[:40]!r} into "
                              f"{back[:40]!r} (scores would compare altered text)")
    new = task.max_new_tokens
    if runner.context and new >= runner.context:
        raise StemmaError(f"task {spec.id} cannot run on {who}: it generates {new} tokens but the context is "
                          f"{runner.context}")


def stored_scores(ws, version_id: str, spec: TaskSpec) -> dict[str, float] | None:
    """The task's stored metrics on the version, or None when any is missing."""
    got = {m: ws.get_metric(version_id, spec.metric_name(m), None, spec.key) for m in spec.metrics}
    return None if any(v is None for v in got.values()) else got


def score_task(ws, version_id: str, task_spec: TaskSpec, runner: Runner | None = None,
               reporter: Reporter | None = None) -> dict[str, float]:
    """A task's metrics on a version, measured once and stored (``task:<id>/<metric>``, keyed by the task's content).

    Returns every metric the task's kind reports, e.g. ``{"chrf": 41.2, "bleu": 12.9}``.
    """
    got = stored_scores(ws, version_id, task_spec)
    if got is not None:
        return got
    runner = runner or Runner(ws, version_id, reporter=reporter)
    runner.memo = lambda s: score_task(ws, version_id, s, runner=runner)
    check_runnable(runner, task_spec)
    reporter = reporter or runner.reporter
    t0 = time.perf_counter()
    with reporter.task(f"{runner.label}: task {task_spec.id}", total=1) as bar:
        result = task_spec.task().score(runner)
        bar.advance(1)
    details = {**result.details, "task": task_spec.id, "kind": task_spec.kind, "definition": task_spec.digest,
               "seconds": round(time.perf_counter() - t0, 3)}
    for m in task_spec.metrics:
        ws.put_metric(version_id, task_spec.metric_name(m), None, task_spec.key, float(result.metrics[m]),
                      details=details)
    return {m: float(result.metrics[m]) for m in task_spec.metrics}


def task_examples(task_spec: TaskSpec) -> dict[str, Any]:
    """What a task asks, for writing it in another harness's format: its kind, generation settings and rows
    (``prompt`` / ``reference`` / ``answer`` / ``choices`` as the kind has them)."""
    t = task_spec.task()
    cfg = t.config
    return {"id": task_spec.id, "kind": task_spec.kind, "metrics": list(task_spec.metrics),
            "max_new_tokens": t.max_new_tokens, "stop": list(getattr(cfg, "stop", ())),
            "delimiter": getattr(cfg, "delimiter", None), "rows": t.examples()}


def evaluate_version(ws, v, reporter: Reporter | None = None, suite: str | None = None) -> dict[str, dict]:
    """Score a version on its node's recorded tasks, its parent on them, and the version on the parent's tasks.

    Every task is checked against both versions' tokenizers first, so a task that cannot run fails before any is
    scored. Returns ``{task id: metrics}`` of the version itself.
    """
    from .suites import recorded_tasks

    reporter = reporter or NullReporter()
    own = recorded_tasks(ws, v.row.node_path, suite)
    parent_id = ws.tree_parent_id(v.id)
    parent_tasks = []
    if parent_id and suite is None:
        parent_tasks = recorded_tasks(ws, ws.version(parent_id).row.node_path)
    mine = {t.digest for t in own}
    work = [(v.id, t) for t in own] + [(v.id, t) for t in parent_tasks if t.digest not in mine]
    if parent_id:
        work += [(parent_id, t) for t in own] + [(parent_id, t) for t in parent_tasks]
    runners: dict[str, Runner] = {}
    todo = [(vid, t) for vid, t in work if stored_scores(ws, vid, t) is None]
    for vid, t in todo:  # checks first: nothing is scored when a task cannot run
        if vid not in runners:
            runners[vid] = Runner(ws, vid, reporter=reporter)
        check_runnable(runners[vid], t)
    out = {}
    for vid, t in work:
        scores = score_task(ws, vid, t, runner=runners.get(vid), reporter=reporter)
        if vid == v.id:
            out[t.id] = scores
    return out


def preflight(ws, spec, targets) -> None:
    """Before a build trains anything: every task of the target nodes against the tokenizer and context the node
    will have, where the registry already knows them (the tree's root is built; only a root makes a tokenizer)."""
    runners: dict[str, Runner] = {}
    from .suites import tasks_of

    for path in spec.order:
        node = spec.nodes[path]
        if path not in targets or not node.eval:
            continue
        root = path
        while spec.nodes[root].parent is not None:
            root = spec.nodes[root].parent
        row = ws.node(root)
        if row is None or not row.current_version:
            continue
        if root not in runners:
            runners[root] = Runner(ws, row.current_version)
        for _, t in tasks_of(spec.suites, node.eval):
            check_runnable(runners[root], t, node=path)
