"""Which model a request means, and the engines that run them within a memory budget.

A request names a node (``en/software/python``: its current version), a pinned version
(``en/software/python@6994441f``) or ``auto`` (a selector picks). Every servable version is
*base + adapter chain*, read from its `LoadPlan`: its nearest ancestor with full weights (the base) and the LoRA
adapters below it.
Versions that share a base share one `Engine` and are batched together; a distilled student or a full
finetune is a base of its own and gets its own engine. Engines are measured once loaded (weights, KV cache,
adapters) and evicted least-recently-used while idle when the total exceeds the budget.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

import psutil

from ..errors import StemmaError
from ..models import families
from ..models.families.serving import DecoderShape, LoraSite
from .config import ServeConfig
from .decoder import Decoder, release_free_memory
from .engine import Engine, Scheduler, Sequence
from .lora import LoraDelta, lora_from_peft
from .selector import select

log = logging.getLogger("stemma.serve")


class ModelNotFoundError(StemmaError):
    """The request names no servable model."""


class CapacityError(StemmaError):
    """The server is full (queue or memory budget); retry later."""


class BusyError(StemmaError):
    """An admin action cannot run while the model is in use."""


@dataclass(frozen=True)
class Target:
    """A servable version: the base engine and the adapter chain to apply."""

    node: str
    version_id: str
    base_id: str
    base_node: str
    adapters: tuple[str, ...]
    """Adapter version ids, base's child first."""
    relation: str
    layer: str
    parent_node: str | None
    context: int
    reason: str | None = None
    """Why ``auto`` chose it."""
    app: str | None = None
    """The app (``app:NAME``) this target answers for."""
    template: str | None = None
    """The app's prompt template, with one ``{prompt}``."""


def _key(model: str, requirements: dict | None) -> str:
    """The cache key of ``auto`` with its requirements, or of an app."""
    return model if model.startswith("app:") else "auto " + repr(sorted((requirements or {}).items()))


class ModelPool:
    """Resolves model names and owns the engines and the scheduler thread."""

    def __init__(self, ws, cfg: ServeConfig):
        self.ws = ws
        self.cfg = cfg
        self.budget = cfg.memory_budget_bytes or psutil.virtual_memory().available // 2
        self.engines: OrderedDict[str, Engine] = OrderedDict()  # base version id -> engine, LRU order
        self.lock = threading.RLock()
        self.scheduler = Scheduler()
        self._targets: dict[str, Target] = {}  # version id -> target (versions are immutable)
        self._names: dict[str, tuple[float, str]] = {}  # model name -> (when, version id)
        self._auto: dict[str, tuple[float, Target]] = {}  # requirements or app name -> (when, target)
        self._refreshing: set[str] = set()
        self._flags: tuple[float, dict] | None = None  # (when, risk.affected)
        self._flags_lock = threading.Lock()

    def close(self) -> None:
        self.scheduler.stop()

    # ------------------------------------------------------------------ names
    def target(self, version_id: str) -> Target:
        t = self._targets.get(version_id)
        if t is not None:
            return t
        try:
            plan = self.ws.plan(version_id)
        except StemmaError as e:  # no full-weight ancestor, or an adapter on a different tokenizer
            raise ModelNotFoundError(str(e)) from None
        me = plan.version
        if plan.loader == "variant":  # e.g. a quantized variant: its layers are not plain linears
            raise ModelNotFoundError(
                f"{me.node}: {plan.base.node} is a {plan.base.relation} variant stored in its own format; the batched "
                "engine serves full weights and LoRA chains")
        arch = self.ws.version(me.id).manifest.get("architecture") or {}
        node = self.ws.node(me.node)
        t = Target(node=me.node, version_id=me.id, base_id=plan.base.id, base_node=plan.base.node,
                   adapters=tuple(a.id for a in plan.adapters), relation=me.relation,
                   layer=node.layer if node else "", parent_node=node.parent_path if node else None,
                   context=int(arch.get("context") or 0))
        self._targets[version_id] = t
        return t

    def resolve_cached(self, model: str, requirements: dict | None = None) -> Target | None:
        """The target of a name resolved before, else None; no I/O on the caller's thread.

        An entry older than ``resolve_ttl_s`` is still answered (names move rarely: when a build sets a new
        current version) while one background thread asks the registry again, so a burst of requests never
        queues up on registry lookups. A choice of ``auto`` (or of an ``auto`` app) is a miss when a risk flag has
        reached its version since, or when the flags are not cached: `resolve` reads them and chooses again.
        """
        now = time.monotonic()
        if model == "auto" or model.startswith("app:"):
            key = _key(model, requirements)
            hit = self._auto.get(key)
            target = hit[1] if hit else None
            if target is not None and self._revocable(target):
                flags = self.flags_cached()
                if flags is None or flags.get(target.version_id):
                    return None
        else:
            key, hit = model, self._names.get(model)
            target = self._targets.get(hit[1]) if hit else None
        if hit and now - hit[0] >= self.cfg.resolve_ttl_s and key not in self._refreshing:
            self._refreshing.add(key)
            threading.Thread(target=self._refresh, args=(key, model, requirements), daemon=True).start()
        return target

    def _refresh(self, key: str, model: str, requirements: dict | None) -> None:
        try:
            self.resolve(model, requirements)  # the entry is stale, so this asks the registry
        except Exception:  # the name went away or the registry is busy: the next request resolves it again
            log.debug("refreshing %s failed", model, exc_info=True)
        finally:
            self._refreshing.discard(key)

    def resolve(self, model: str, requirements: dict | None = None) -> Target:
        """A model name (node, node@version, auto, app:NAME) -> its target; unknown names raise ModelNotFoundError.

        A recent choice of ``auto`` (or of an ``auto`` app) is answered unless a risk flag has reached its version
        since: then it is made again without it.
        """
        now = time.monotonic()
        if model == "auto" or model.startswith("app:"):
            key = _key(model, requirements)
            hit = self._auto.get(key)
            if hit and now - hit[0] < self.cfg.resolve_ttl_s and not (
                    self._revocable(hit[1]) and self.flags().get(hit[1].version_id)):
                return hit[1]
            if model == "auto":
                flags = {} if self.cfg.allow_flagged else self.flags()
                sel = select(self.ws, **(requirements or {}), servable=self._servable, flags=flags)
                t = Target(**{**self.target(sel.version_id).__dict__, "reason": sel.reason})
            else:
                t = self._app(model)
            self._auto[key] = (now, t)
            return t
        hit = self._names.get(model)
        if hit and now - hit[0] < self.cfg.resolve_ttl_s:
            return self.target(hit[1])
        if not model or len(model) > 400:
            raise ModelNotFoundError(f"unknown model {model[:60]!r}")
        try:
            v = self.ws.resolve_version(model)
        except StemmaError:
            raise ModelNotFoundError(f"the model {model!r} does not exist; see GET /v1/models") from None
        self._names[model] = (now, v.id)
        return self.target(v.id)

    def _revocable(self, t: Target) -> bool:
        """Whether ``t`` is a choice of ``auto`` that a risk flag reaching its version takes back (never with
        ``allow_flagged``)."""
        return t.reason is not None and not self.cfg.allow_flagged

    def _app(self, model: str) -> Target:
        from .. import apps

        try:
            a = apps.get(self.ws, model.removeprefix("app:"), flags={})
        except StemmaError:
            raise ModelNotFoundError(f"the model {model!r} does not exist; see GET /v1/models") from None
        t = self.resolve(a.node) if a.node else self.resolve("auto", a.requirements)
        return replace(t, app=a.name, template=a.template)

    # ------------------------------------------------------------------ risk flags
    def flags_cached(self) -> dict[str, list] | None:
        """`stemma.risk.affected` as read less than ``flags_ttl_s`` ago, else None (no I/O on the caller's thread)."""
        hit = self._flags
        if hit is not None and time.monotonic() - hit[0] < self.cfg.flags_ttl_s:
            return hit[1]
        return None

    def flags(self) -> dict[str, list]:
        """Version id -> the active risk flags reaching it: one registry query, cached ``flags_ttl_s``."""
        from ..risk import affected

        with self._flags_lock:  # one query however many requests find the answer expired
            hit = self.flags_cached()
            if hit is None:
                hit = affected(self.ws)
                self._flags = (time.monotonic(), hit)
            return hit

    def refusal(self, t: Target, flags: dict[str, list]) -> str | None:
        """Why a target must not answer (the flags reaching its version), or None; ``allow_flagged`` allows all."""
        found = flags.get(t.version_id)
        if not found or self.cfg.allow_flagged:
            return None
        why = "; ".join(f.label for f in found)
        if t.app:
            return f"app {t.app} is suspended: its node {t.node} ({t.version_id[:12]}) is reached by {why}"
        return f"{t.node} ({t.version_id[:12]}) is not served: it is reached by {why}"

    def forget_names(self) -> None:
        """Drop cached name resolutions (a node's current version moved: an accepted update)."""
        self._names.clear()
        self._auto.clear()

    def _servable(self, version_id: str) -> bool:
        try:
            self.target(version_id)
            return True
        except StemmaError:
            return False

    def models(self) -> list[dict]:
        """Each node's current version that can be served, as OpenAI model objects (vLLM's adapter fields), with
        the risk flags reaching it; then the apps (``app:NAME``), active or suspended."""
        from .. import apps

        flags = self.flags()
        out = []
        for n in self.ws.nodes():
            if not n.current_version:
                continue
            try:
                t = self.target(n.current_version)
            except StemmaError:
                continue
            row = self.ws.version(t.version_id).row
            out.append({"id": t.node, "object": "model", "created": int(row.created_at.timestamp()),
                        "owned_by": "stemma", "root": t.base_node, "parent": t.parent_node,
                        "relation": t.relation, "layer": t.layer, "version": t.version_id,
                        "max_model_len": t.context, "loaded": t.base_id in self.engines,
                        "flags": [f.label for f in flags.get(t.version_id, ())]})
        for a in apps.apps(self.ws, flags):
            out.append({"id": a.model, "object": "model", "created": int(a.created_at.timestamp()),
                        "owned_by": "stemma", "app": a.name, "node": a.node or "auto", "version": a.version_id,
                        "requirements": a.requirements, "description": a.description, "status": a.status,
                        "flags": [f.label for f in a.flags]})
        return out

    # ------------------------------------------------------------------ engines
    def engine(self, t: Target) -> Engine:
        """The engine of a target's base, loading it (and evicting idle ones over the budget) if needed."""
        with self.lock:
            e = self.engines.get(t.base_id)
            if e is not None:
                self.engines.move_to_end(t.base_id)
                return e
            e = self._load_engine(t)
            need = e.decoder.nbytes
            used = sum(x.decoder.nbytes for x in self.engines.values())
            for bid in list(self.engines):
                if used + need <= self.budget:
                    break
                old = self.engines[bid]
                if old.busy:
                    continue
                self._drop(bid)
                used -= old.decoder.nbytes
            if used + need > self.budget:
                raise CapacityError(f"model {t.base_node} needs {need} bytes; the memory budget "
                                    f"({self.budget}) is held by busy models; retry later")
            self.engines[t.base_id] = e
            self.scheduler.add(e)
            log.info("loaded %s (%d bytes)", t.base_node, need)
            return e

    def _load_engine(self, t: Target) -> Engine:
        from ..models.tokenizer import eos_id

        def build() -> tuple[Decoder, Callable[[str], LoraSite | None]]:
            hf = self.ws.load_model(t.base_id)
            family = families.checked(hf.config)
            shape = family.decoder_shape(hf.config)
            return Decoder(family.decoder_weights(hf), shape, self.cfg.max_batch), \
                functools.partial(family.lora_site, config=hf.config)

        # On the scheduler thread, the only one that runs tensor work (see `Scheduler`). The decoder keeps copies
        # of its own: the Hugging Face model is gone once `build` returns, and its freed memory goes back.
        decoder, site = self.scheduler.call(build)
        release_free_memory()
        tok = self.ws.tokenizer(self.ws.plan(t.base_id).base.tokenizer)

        def load_adapter(key: tuple[str, ...]) -> LoraDelta:
            return LoraDelta.concat([self._delta(vid, decoder.shape, site) for vid in key])

        return Engine(t.base_node, decoder, tok, eos_id(tok), load_adapter, max_adapters=self.cfg.max_adapters,
                      adapter_budget_bytes=self.cfg.adapter_budget_bytes,
                      max_prefill_tokens=self.cfg.max_prefill_tokens)

    def _delta(self, version_id: str, shape: DecoderShape, site: Callable[[str], LoraSite | None]) -> LoraDelta:
        from safetensors.torch import load_file

        files = dict(self.ws.plan(version_id).version.files)
        cfg = json.loads(self.ws.store.get_bytes(files["adapter_config.json"]))
        tensors = load_file(str(self.ws.store.verified_path(files["adapter_model.safetensors"])))
        return lora_from_peft(tensors, cfg, shape, site)

    def _drop(self, base_id: str) -> None:
        e = self.engines.pop(base_id)
        with e.lock:
            e.closed = True
        self.scheduler.remove(e)
        log.info("unloaded %s", e.name)

    def submit(self, t: Target, seqs: list[Sequence]) -> Engine:
        """Queue sequences on the target's engine (loaded on demand)."""
        for _ in range(3):  # an engine evicted between lookup and submit is simply loaded again
            e = self.engine(t)
            if len(e.waiting) + len(e.running) + len(seqs) > self.cfg.max_queue:
                raise CapacityError(f"model {t.node} has {self.cfg.max_queue} sequences queued; retry later")
            try:
                e.submit(seqs)
            except StemmaError:
                continue
            self.scheduler.notify()
            return e
        raise CapacityError(f"model {t.node} keeps being unloaded; retry later")

    # ------------------------------------------------------------------ admin
    def load(self, t: Target) -> dict:
        e = self.engine(t)
        if t.adapters:
            self.scheduler.call(lambda: e.preload(t.adapters))
        return {"model": t.node, "version": t.version_id, "base": t.base_node, "bytes": e.decoder.nbytes}

    def unload(self, t: Target) -> dict:
        """Unload the target's adapter, or its whole engine when it is a base."""
        with self.lock:
            e = self.engines.get(t.base_id)
            if e is None:
                return {"model": t.node, "unloaded": False, "reason": "not loaded"}
            if t.adapters:
                if not e.unload(t.adapters):
                    raise BusyError(f"adapter {t.node} is in use by running requests")
                return {"model": t.node, "unloaded": True}
            if e.busy:
                raise BusyError(f"model {t.node} has requests in flight")
            self._drop(t.base_id)
            return {"model": t.node, "unloaded": True}

    def stats(self) -> list[dict]:
        with self.lock:
            return [{"base": e.name, "queue": e.queue_depth, "running": len(e.running), "batch": e.last_batch,
                     "adapters": len(e.adapters), "bytes": e.decoder.nbytes, "tokens": e.tokens, "steps": e.steps}
                    for e in self.engines.values()]
