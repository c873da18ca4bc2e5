"""Continuous batching over one base model: requests join and leave between decode steps.

An `Engine` owns one `Decoder` (one base version's weights, KV cache and adapter bank). Each step it
(1) drops sequences whose client went away, (2) admits waiting sequences into free cache slots and
prefills them (packed, in chunks: `Decoder.prefill`), (3) runs one decode step for every running sequence, whatever
its adapter, and (4) samples, detokenises and reports each row's new text. Finished rows leave at once
and the last slot moves into the hole, so running rows always occupy slots ``0 .. B-1``.

Adapters load on demand into the bank and are evicted least-recently-used when the engine holds
``max_adapters`` of them or more than ``adapter_budget_bytes``; an adapter in use by a sequence is never
evicted (the sequence waits instead). One `Scheduler` thread steps every engine in turn: the machine's
cores go to the matrix multiplies, not to competing Python threads.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from ..errors import StemmaError
from .decoder import Decoder, release_free_memory
from .lora import LoraDelta

log = logging.getLogger("stemma.serve")
_ids = itertools.count(1)
PREFILL_ROWS = 16
"""Rows per prefill call. The linears see only the prompts' real tokens; attention pads a chunk's prompts to its
longest, so rows sorted by prompt length in small chunks keep that padding low."""


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence is generated."""

    max_tokens: int
    """New tokens at most (the prompt plus these must fit the context)."""
    temperature: float = 1.0
    """0 is greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches this."""
    seed: int | None = None
    """Seed of this sequence's own generator: the same seed gives the same text whatever else is batched."""
    stop: tuple[str, ...] = ()
    """Strings that end generation; the text is cut before the first one and never contains it."""
    ignore_eos: bool = False
    """Keep generating past the end-of-text token (benchmarks want a fixed length)."""
    top_k: int = 0
    """Sample among the k most likely tokens only; 0 or -1: every token."""
    min_p: float = 0.0
    """Drop tokens less likely than this fraction of the most likely one's probability."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the completion already holds (OpenAI and vLLM semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the completion already holds it."""
    repetition_penalty: float = 1.0
    """Tokens of the prompt or the completion: positive logits divided by it, negative ones multiplied (CTRL,
    Keskar et al., 2019, as vLLM and transformers apply it); 1: off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) pairs added to the logits before anything else."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives (None: nothing). The
    log-probabilities are the model's own (before penalties, temperature and truncation), as vLLM's default."""

    @property
    def penalised(self) -> bool:
        """Whether a presence, frequency or repetition penalty applies."""
        return bool(self.presence_penalty) or bool(self.frequency_penalty) or self.repetition_penalty != 1.0

    @property
    def shaped(self) -> bool:
        """Whether the logits are changed before choosing (bias or penalties)."""
        return bool(self.logit_bias) or self.penalised

    @property
    def truncated(self) -> bool:
        """Whether sampling keeps only some tokens (top-k, top-p, min-p)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability and the most likely alternatives (token id, log-probability)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class Event:
    """What a sequence reports to its consumer: new text, or the end (with a reason or an error)."""

    text: str = ""
    done: bool = False
    finish_reason: str | None = None
    """``stop`` (end-of-text or a stop string), ``length`` (max_tokens or context), ``error``."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    """For the tokens generated since the previous event, when the request asked for them."""


@dataclass(eq=False)
class Sequence:
    """One generation: a prompt, its parameters, the adapter chain to apply and where to report events.

    ``sink`` is called from the scheduler thread; it must be quick and thread-safe (the API hands events
    to its event loop with ``call_soon_threadsafe``).
    """

    prompt: list[int]
    params: SamplingParams
    adapter: tuple[str, ...]
    """Adapter version ids from the base down (empty: the base itself)."""
    sink: Callable[[Event], None]
    label: str = ""
    """Name for metrics and logs (the requested model)."""
    stream: bool = True
    """Report text as it is generated; False: one event at the end, with all the text."""
    id: int = field(default_factory=lambda: next(_ids))
    generated: list[int] = field(default_factory=list)
    emitted: int = 0
    """Characters of the decoded text already reported."""
    cancelled: bool = False
    finished: bool = False
    aid: int = 0
    """Adapter bank slot while running."""
    t_submit: float = field(default_factory=time.perf_counter)
    t_first: float | None = None
    generator: torch.Generator | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    """Log-probabilities of tokens not yet reported."""

    def cancel(self) -> None:
        """Ask the engine to drop this sequence (safe from any thread; takes effect before the next step)."""
        self.cancelled = True

    @property
    def position(self) -> int:
        """Tokens in the cache once the last generated token is fed back."""
        return len(self.prompt) + len(self.generated) - 1


@dataclass
class _AdapterEntry:
    slot: int
    nbytes: int
    refs: int = 0


class Engine:
    """Batched decoding of one base model and every adapter child of it.

    Args:
        name: the base's node path (for metrics and messages).
        decoder: weights, cache and adapter bank.
        tokenizer: the tree's ``tokenizers.Tokenizer``.
        eos_id: the end-of-text token.
        load_adapter: adapter version ids (base first) -> combined delta; called on the scheduler thread.
        max_adapters: adapters held at once (LRU beyond).
        adapter_budget_bytes: bytes of adapters held at once (LRU beyond).
        max_prefill_tokens: padded prompt tokens prefilled per step, so one step stays short for running streams.
    """

    def __init__(self, name: str, decoder: Decoder, tokenizer, eos_id: int,
                 load_adapter: Callable[[tuple[str, ...]], LoraDelta], max_adapters: int = 32,
                 adapter_budget_bytes: int = 512 << 20, max_prefill_tokens: int = 2048):
        self.name = name
        self.decoder = decoder
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.load_adapter = load_adapter
        self.max_adapters = max_adapters
        self.adapter_budget_bytes = adapter_budget_bytes
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # index = cache slot
        self.adapters: OrderedDict[tuple[str, ...], _AdapterEntry] = OrderedDict()  # LRU order, oldest first
        self.lock = threading.Lock()  # guards `waiting` and `adapters` against the API threads
        self.penalties: Penalties | None = None
        """Penalty state of the running sequences, made at the first penalised one."""
        self.last_used = time.monotonic()
        self.closed = False
        # Statistics read by /metrics.
        self.steps = 0
        self.tokens = 0
        self.last_batch = 0

    # ------------------------------------------------------------------ API side
    @property
    def context(self) -> int:
        return self.decoder.shape.context

    def submit(self, seqs: list[Sequence]) -> None:
        with self.lock:
            if self.closed:
                raise StemmaError(f"model {self.name} was unloaded; retry")
            for s in seqs:
                if s.params.seed is not None:
                    s.generator = torch.Generator().manual_seed(s.params.seed)
                elif s.params.temperature > 0:
                    s.generator = torch.Generator().manual_seed(secrets.randbits(63))
                self.waiting.append(s)
            self.last_used = time.monotonic()

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def busy(self) -> bool:
        """Sequences still to serve (finished rows waiting to be retired at the end of a step do not count)."""
        return bool(self.waiting) or any(not s.finished for s in self.running)

    def preload(self, adapter: tuple[str, ...]) -> None:
        """Load an adapter now (admin), so the first request does not pay for it."""
        with self.lock:
            if adapter and adapter not in self.adapters:
                self._load(adapter)

    def unload(self, adapter: tuple[str, ...]) -> bool:
        """Drop an adapter from the bank; False when a running sequence uses it."""
        with self.lock:
            e = self.adapters.get(adapter)
            if e is None:
                return True
            if e.refs:
                return False
            self.decoder.remove_adapter(e.slot)
            del self.adapters[adapter]
            return True

    # ------------------------------------------------------------------ adapters (under self.lock)
    def _load(self, key: tuple[str, ...]) -> _AdapterEntry | None:
        delta = self.load_adapter(key)
        while self.adapters and (len(self.adapters) >= self.max_adapters or
                                 sum(e.nbytes for e in self.adapters.values()) + delta.nbytes
                                 > self.adapter_budget_bytes):
            victim = next((k for k, e in self.adapters.items() if e.refs == 0), None)
            if victim is None:
                return None  # every held adapter is in use: wait for one to finish
            self.decoder.remove_adapter(self.adapters.pop(victim).slot)
        entry = _AdapterEntry(slot=self.decoder.add_adapter(delta), nbytes=delta.nbytes)
        self.adapters[key] = entry
        del delta
        release_free_memory()  # the adapter's file, its conversion and the bank's previous stacks
        return entry

    def _acquire(self, seq: Sequence) -> bool:
        """Pin the sequence's adapter in the bank (loading it if needed); False if it must wait."""
        if not seq.adapter:
            seq.aid = 0
            return True
        entry = self.adapters.get(seq.adapter)
        if entry is None:
            entry = self._load(seq.adapter)
            if entry is None:
                return False
        self.adapters.move_to_end(seq.adapter)
        entry.refs += 1
        seq.aid = entry.slot
        return True

    def _release(self, seq: Sequence) -> None:
        if seq.adapter and seq.adapter in self.adapters:
            self.adapters[seq.adapter].refs -= 1
        if self.penalties is not None:
            self.penalties.release(seq)

    # ------------------------------------------------------------------ the step
    def step(self) -> int:
        """Admit, prefill, decode once; returns the number of tokens produced."""
        self.steps += 1
        self.last_used = time.monotonic()
        with self.lock:
            self._drop_cancelled()
            admitted = self._admit()
        produced = 0
        if admitted:
            produced += self._prefill(admitted)
        decoding = [s for s in self.running if s not in admitted] if admitted else list(self.running)
        if decoding:
            produced += self._decode(decoding)
        with self.lock:
            self._retire()
        self.tokens += produced
        return produced

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for s in self.running:
            if s.cancelled:
                s.finished = True

    def _admit(self) -> list[Sequence]:
        free = self.decoder.max_slots - len(self.running)
        admitted: list[Sequence] = []
        skipped: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(admitted) < free:
            s = self.waiting[0]
            if admitted and len(s.prompt) > budget:
                break
            budget -= len(s.prompt)
            self.waiting.popleft()
            try:
                ok = self._acquire(s)
            except StemmaError as e:
                self._fail(s, str(e))
                continue
            except Exception as e:  # a broken blob must fail this request, not the scheduler
                log.exception("loading adapter for %s", s.label)
                self._fail(s, f"cannot load adapter: {e}")
                continue
            if not ok:
                skipped.append(s)
                continue
            admitted.append(s)
        self.waiting.extendleft(reversed(skipped))
        # Prefill fills the slots right after the running ones, in order; shortest prompts first so that
        # prefill chunks of similar lengths waste little on padding.
        admitted.sort(key=lambda x: len(x.prompt))
        self.running.extend(admitted)
        return admitted

    def _prefill(self, seqs: list[Sequence]) -> int:
        """Prefill admitted rows (sorted by length) in chunks of PREFILL_ROWS."""
        slot0 = len(self.running) - len(seqs)
        for i in range(0, len(seqs), PREFILL_ROWS):
            self._prefill_chunk(seqs[i : i + PREFILL_ROWS], slot0 + i)
        return len(seqs)

    def _prefill_chunk(self, seqs: list[Sequence], slot0: int) -> None:
        T = max(len(s.prompt) for s in seqs)
        tokens = torch.full((len(seqs), T), self.eos_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            tokens[i, : len(s.prompt)] = torch.tensor(s.prompt)
        lengths = torch.tensor([len(s.prompt) for s in seqs])
        aids = torch.tensor([s.aid for s in seqs])
        logits = self.decoder.prefill(tokens, lengths, slot0, aids)
        now = time.perf_counter()
        for s in seqs:
            s.t_first = now
        self._advance(seqs, logits)

    def _decode(self, seqs: list[Sequence]) -> int:
        # `seqs` is a prefix of `self.running` (rows admitted this step sit at the end), so slots are 0..B-1.
        tokens = torch.tensor([s.generated[-1] for s in seqs])
        positions = torch.tensor([s.position for s in seqs])
        aids = torch.tensor([s.aid for s in seqs])
        self.last_batch = len(seqs)
        logits = self.decoder.decode(tokens, positions, aids)
        self._advance(seqs, logits)
        return len(seqs)

    def _advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        if self.penalties is None and any(s.params.penalised for s in seqs):
            self.penalties = Penalties(self.decoder.max_slots, logits.shape[1])
        nxt, lps = sample(logits, seqs, self.penalties)
        for i, (s, t) in enumerate(zip(seqs, nxt)):
            if s.finished:
                continue
            self._append(s, t, lps.get(i) if lps else None)

    def _append(self, s: Sequence, token: int, logprob: TokenLogprob | None = None) -> None:
        p = s.params
        if token == self.eos_id and not p.ignore_eos:
            self._finish(s, "stop", self._text(s))
            return
        s.generated.append(token)
        if logprob is not None:
            s.pending_logprobs.append(logprob)
        full = len(s.generated) >= p.max_tokens or len(s.prompt) + len(s.generated) >= self.context
        if not s.stream and not p.stop:  # nobody reads partial text: detokenise once, at the end
            if full:
                self._finish(s, "length", self._text(s))
            return
        text = self._text(s)
        if p.stop:
            start = max(0, s.emitted - max(len(x) for x in p.stop))
            hits = [i for i in (text.find(x, start) for x in p.stop) if i >= 0]
            if hits:
                self._finish(s, "stop", text[: min(hits)])
                return
        if full:
            self._finish(s, "length", text)
            return
        if not s.stream:
            return
        safe = _safe_prefix(text, p.stop)
        if safe > s.emitted:
            _emit(s, Event(text=text[s.emitted : safe]))
            s.emitted = safe

    def _text(self, s: Sequence) -> str:
        return self.tokenizer.decode(s.generated, skip_special_tokens=False)

    def _finish(self, s: Sequence, reason: str, text: str) -> None:
        s.finished = True
        rest = text[s.emitted :] if len(text) > s.emitted else ""
        s.emitted = len(text)
        _emit(s, Event(text=rest, done=True, finish_reason=reason, prompt_tokens=len(s.prompt),
                       completion_tokens=len(s.generated)))

    def _fail(self, s: Sequence, message: str) -> None:
        s.finished = True
        _emit(s, Event(done=True, finish_reason="error", error=message, prompt_tokens=len(s.prompt)))

    def _retire(self) -> None:
        """Remove finished rows; the last running slot moves into each hole (one cache copy per finish)."""
        for i in range(len(self.running) - 1, -1, -1):
            s = self.running[i]
            if not s.finished:
                continue
            self._release(s)
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.decoder.move_slot(last, i, moved.position + 1)
                self.running[i] = moved
            self.running.pop()

    def fail_all(self, message: str) -> None:
        """End every sequence with an error (after a bug in a step), leaving the engine empty and usable."""
        with self.lock:
            for s in list(self.waiting) + self.running:
                if not s.finished:
                    self._fail(s, message)
                self._release(s)
            self.waiting.clear()
            self.running.clear()


def _emit(s: Sequence, ev: Event) -> None:
    """Hand an event to the consumer; a consumer that is gone (closed event loop) cancels the sequence."""
    if s.pending_logprobs:
        ev.logprobs, s.pending_logprobs = s.pending_logprobs, []
    try:
        s.sink(ev)
    except Exception:
        s.cancelled = True


def _safe_prefix(text: str, stop: tuple[str, ...]) -> int:
    """How much of the text can be shown now: not a trailing partial UTF-8 character, nor a possible stop start."""
    end = len(text)
    while end and text[end - 1] == "\ufffd":
        end -= 1
    for x in stop:
        for k in range(min(len(x) - 1, end), 0, -1):
            if text[end - k : end] == x[:k]:
                end -= k
                break
    return end


def sample(logits: torch.Tensor, seqs: list[Sequence], penalties: Penalties | None = None
           ) -> tuple[list[int], dict[int, TokenLogprob] | None]:
    """Next token per row, and the log-probabilities asked for (row -> `TokenLogprob`).

    Work is on tensors over the batch's rows: logit bias, then presence / frequency / repetition penalties, then
    argmax for greedy rows; sampled rows are divided by their temperature and, where asked, truncated (top-k,
    top-p, min-p) in one sort, then each draws one uniform number from its own generator and takes the token
    where the cumulative probability passes it. A row's token depends only on its own logits, parameters and
    generator, so a seed gives the same text whatever the row is batched with.

    ``penalties`` carries the penalised sequences' state from step to step (the engine's); without it, one is
    made for this call from each sequence's whole prompt and completion.
    """
    ps = [s.params for s in seqs]
    if all(p.temperature <= 0 and not p.shaped and p.logprobs is None for p in ps):
        return logits.max(dim=-1).indices.tolist(), None  # max() is several times faster than argmax() on CPU
    raw = logits.float()
    x = _shape(raw, seqs, penalties)
    out = x.max(dim=-1).indices
    sampled = [i for i, p in enumerate(ps) if p.temperature > 0]
    for truncated in (False, True):  # rows that truncate sort their vocabulary; the others need not
        rows = [i for i in sampled if ps[i].truncated == truncated]
        if rows:
            out[rows] = _draw(x[rows], [seqs[i] for i in rows], truncated)
    tokens = out.tolist()
    return tokens, _logprobs(raw, tokens, ps)


def _shape(x: torch.Tensor, seqs: list[Sequence], penalties: Penalties | None = None) -> torch.Tensor:
    """The logits after each row's logit bias and penalties (a copy where any row has them), in vLLM's order: bias,
    then the repetition penalty on every token of the prompt or the completion, then frequency and presence."""
    ps = [s.params for s in seqs]
    shaped = [i for i, p in enumerate(ps) if p.shaped]
    if not shaped:
        return x
    x = x.clone()
    bias = [(i, t, b) for i in shaped for t, b in ps[i].logit_bias]
    if bias:
        r, t, b = zip(*bias)
        x.index_put_((torch.tensor(r), torch.tensor(t)), torch.tensor(b, dtype=x.dtype), accumulate=True)
    penalised = [i for i in shaped if ps[i].penalised]
    if not penalised:
        return x
    if penalties is None:
        penalties = Penalties(len(penalised), x.shape[1])
    rows = penalties.update([seqs[i] for i in penalised])
    rep = [(i, r, ps[i].repetition_penalty) for i, r in zip(penalised, rows) if ps[i].repetition_penalty != 1]
    if rep:
        at, r, factor = zip(*rep)
        factor = torch.tensor(factor, dtype=x.dtype)[:, None]
        _rows_apply(x, at, lambda v: torch.where(_rows(penalties.seen, r),
                                                 torch.where(v > 0, v / factor, v * factor), v))
    sub = [(i, r) for i, r in zip(penalised, rows) if ps[i].presence_penalty or ps[i].frequency_penalty]
    if sub:
        at, r = zip(*sub)
        _rows_apply(x, at, lambda v: v.sub_(_rows(penalties.subtract, r)))
    return x


def _rows(t: torch.Tensor, r: tuple[int, ...]) -> torch.Tensor:
    """``t[r]``: a view when the rows are consecutive (sequences that started together hold consecutive rows)."""
    if r == tuple(range(r[0], r[0] + len(r))):
        return t[r[0] : r[0] + len(r)]
    return t.index_select(0, torch.tensor(r))


def _rows_apply(x: torch.Tensor, at: tuple[int, ...], fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """``x[at] = fn(x[at])``; in place over the whole of x when ``at`` is every row in order (the usual batch, where
    every request asks for the same), as advanced indexing of [rows, vocabulary] costs more than the work."""
    if len(at) == len(x):  # `at` holds distinct rows in order: all of them
        y = fn(x)
        if y is not x:
            x.copy_(y)
        return
    idx = torch.tensor(at)
    x.index_copy_(0, idx, fn(x.index_select(0, idx)))


class Penalties:
    """The running state of penalised sequences, one row of ``[rows, vocabulary]`` tensors each, kept from step to
    step: what frequency and presence subtract from each token's logit, and which tokens the repetition penalty
    applies to.

    A decode step appends one token per sequence, so it updates every row with one batched write and applies the
    penalties with one gather (a slice, for rows made together) per kind over the batch. Rebuilding the penalty
    from each sequence's whole completion every step (sparse, over its distinct tokens) took 1.2 ms per step at 64
    rows and a vocabulary of 4,096, an eighth of a GPT-2 bench decode step; this takes about 0.4 ms. A row belongs
    to a sequence (not to a cache slot, which moves as rows finish) from its first penalised step until the engine
    releases it.
    """

    def __init__(self, rows: int, vocab: int):
        self.subtract = torch.zeros(rows, vocab)
        """frequency_penalty x occurrences in the completion + presence_penalty x [occurs]."""
        self.generated = torch.zeros(rows, vocab, dtype=torch.bool)
        """Tokens the completion holds."""
        self.seen = torch.zeros(rows, vocab, dtype=torch.bool)
        """Tokens of the prompt or the completion (repetition penalty)."""
        self.free = list(range(rows - 1, -1, -1))
        self.rows: dict[int, list[int]] = {}
        """Sequence id -> [row, generated tokens already counted in]."""

    def update(self, seqs: list[Sequence]) -> list[int]:
        """Each sequence's row (made at its first call) brought up to date with the tokens appended since."""
        rows, pending = [], []
        for s in seqs:
            got = self.rows.get(s.id)
            if got is None:
                got = self.rows[s.id] = [self._take(), 0]
                if s.params.repetition_penalty != 1:
                    self.seen[got[0], s.prompt] = True
            rows.append(got[0])
            if got[1] < len(s.generated):
                pending.append((got[0], s.params, s.generated[got[1]:]))
                got[1] = len(s.generated)
        # Wave k writes the k-th pending token of every row, so no (row, token) repeats within one batched write
        # (a decode step has one wave: one new token per row).
        for k in range(max((len(toks) for _, _, toks in pending), default=0)):
            wave = [(r, toks[k], p.frequency_penalty, p.presence_penalty) for r, p, toks in pending if k < len(toks)]
            r, t, freq, presence = (torch.tensor(v) for v in zip(*wave))
            first = ~self.generated[r, t]
            self.subtract[r, t] += freq.float() + presence.float() * first
            self.generated[r, t] = True
            self.seen[r, t] = True
        return rows

    def release(self, s: Sequence) -> None:
        got = self.rows.pop(s.id, None)
        if got is not None:
            self.free.append(got[0])

    def _take(self) -> int:
        if not self.free:  # more sequences than rows: twice the rows
            n = self.subtract.shape[0]
            self.subtract = torch.cat([self.subtract, torch.zeros_like(self.subtract)])
            self.generated = torch.cat([self.generated, torch.zeros_like(self.generated)])
            self.seen = torch.cat([self.seen, torch.zeros_like(self.seen)])
            self.free = list(range(2 * n - 1, n - 1, -1))
        r = self.free.pop()
        self.subtract[r].zero_()
        self.generated[r].zero_()
        self.seen[r].zero_()
        return r


def _draw(x: torch.Tensor, seqs: list[Sequence], truncated: bool) -> torch.Tensor:
    """One token per row of ``x`` [R, V] (shaped logits): temperature, optional truncation, inverse-CDF sampling."""
    ps = [s.params for s in seqs]
    z = x / torch.tensor([p.temperature for p in ps])[:, None]
    order = None
    if truncated:
        z, order = z.sort(dim=-1, descending=True)
    probs = torch.softmax(z, dim=-1)
    if truncated:
        V = probs.shape[1]
        k = torch.tensor([p.top_k if p.top_k > 0 else V for p in ps])[:, None]
        top_p = torch.tensor([p.top_p for p in ps])[:, None]
        min_p = torch.tensor([p.min_p for p in ps])[:, None]
        keep = torch.arange(V)[None, :] < k
        keep &= probs.cumsum(-1) - probs < top_p  # tokens before the mass reached top_p, and the one reaching it
        keep &= probs >= min_p * probs[:, :1]
        keep[:, 0] = True  # the most likely token always stays
        probs = probs * keep
    cdf = probs.cumsum(-1)
    u = torch.cat([torch.rand(1, generator=s.generator) for s in seqs]) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u[:, None], right=True).clamp_(max=cdf.shape[1] - 1)
    return pick[:, 0] if order is None else order.gather(1, pick)[:, 0]


def _logprobs(raw: torch.Tensor, tokens: list[int], ps: list[SamplingParams]) -> dict[int, TokenLogprob] | None:
    """The model's log-probability of each chosen token and the ``logprobs`` most likely ones, for rows asking."""
    rows = [i for i, p in enumerate(ps) if p.logprobs is not None]
    if not rows:
        return None
    lp = torch.log_softmax(raw[rows], dim=-1)
    chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows])[:, None])[:, 0].tolist()
    k = max(ps[i].logprobs for i in rows)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    return {i: TokenLogprob(tokens[i], chosen[j], tuple(zip(top_i[j][: ps[i].logprobs], top_v[j][: ps[i].logprobs])))
            for j, i in enumerate(rows)}


class Scheduler:
    """One thread that steps every engine with work, and sleeps when none has any.

    It is also the only thread that runs tensor work (`call`: loading a base model): PyTorch's OpenMP pool
    belongs to the thread that first uses it, and once a second thread has run a parallel operation the two
    pools contend for the cores; measured here, a batched LoRA matmul pair then took 3x longer on the
    scheduler thread and decode throughput fell by a quarter.
    """

    def __init__(self):
        self.engines: list[Engine] = []
        self.cv = threading.Condition()
        self.stopping = False
        self.calls: deque[tuple[Callable[[], object], Future]] = deque()
        self.thread = threading.Thread(target=self._run, name="stemma-scheduler", daemon=True)
        self.thread.start()

    def add(self, engine: Engine) -> None:
        with self.cv:
            self.engines.append(engine)

    def remove(self, engine: Engine) -> None:
        with self.cv:
            self.engines.remove(engine)

    def notify(self) -> None:
        with self.cv:
            self.cv.notify_all()

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the scheduler thread between steps and return its result (or raise its error)."""
        if threading.current_thread() is self.thread:
            return fn()
        fut: Future = Future()
        with self.cv:
            if self.stopping:
                raise StemmaError("the server is shutting down")
            self.calls.append((fn, fut))
            self.cv.notify_all()
        return fut.result()

    def _run_calls(self) -> None:
        while True:
            with self.cv:
                if not self.calls:
                    return
                fn, fut = self.calls.popleft()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as e:  # handed to the caller, who raises it
                    fut.set_exception(e)

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout=10)
        with self.cv:
            while self.calls:
                self.calls.popleft()[1].set_exception(StemmaError("the server is shutting down"))

    def _run(self) -> None:
        busy = False
        while True:
            with self.cv:
                idle = not self.stopping and not self.calls and not any(e.has_work() for e in self.engines)
            if idle and busy:
                # Going idle: hand back what the batches' temporaries left in this thread's heap (prefill
                # activations, fused weight rebuilds), so a server holds what its models need while it waits.
                # Measured on the serving benchmark's base: 1313 -> 1244 MB after 64 requests; a few ms.
                release_free_memory()
            busy = not idle
            with self.cv:
                while not self.stopping and not self.calls and not any(e.has_work() for e in self.engines):
                    self.cv.wait(timeout=1.0)
                if self.stopping:
                    return
            self._run_calls()
            with self.cv:
                engines = [e for e in self.engines if e.has_work()]
            for e in engines:
                try:
                    e.step()
                except Exception:  # a bug must not take the server down: fail this engine's requests, go on
                    log.exception("engine %s step failed", e.name)
                    e.fail_all("internal error in the decoding engine")
