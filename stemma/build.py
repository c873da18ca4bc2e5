"""`stemma build`: reconcile the registry to stemma.yaml, like make.

For each node, parents first, the recipe key is computed from (node, method, full config, parent version,
dataset versions, tokenizer, method-specific inputs such as checkpoint hashes). A version with that key is
reused; otherwise the method runs (resuming from its checkpoint if an earlier run was killed), its files go
into the store, and one registry transaction publishes the version. A changed parent changes the key of
every descendant, so they rebuild.

Several builders may share one registry and store. Each node is built under its lock in the registry
(`Workspace.node_lock`), taken parents first and one at a time, so builders of independent subtrees run at once
and two that reach the same node build it once: the second waits, then finds the version by its recipe key. The
datasets' curation runs under the locks of its work directories (`Workspace.curation_lock`).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass

from . import distributed
from .data.curate.pipeline import Curation
from .data.ingest import BuiltDataset, built_from, curation_for
from .errors import StemmaError
from .evaluate.evaluator import Evaluator
from .evaluate.runner import evaluate_version as evaluate_tasks
from .evaluate.suites import record as record_tasks
from .methods import get
from .progress import NullReporter, Reporter
from .spec import NodeSpec, TreeSpec
from .store import canonical_json, sha256_bytes
from .train import BuildContext
from .train.registry import Planned
from .workspace import VersionInfo, Workspace


@dataclass
class BuildEvent:
    node: str
    action: str  # built | reused
    version: str
    seconds: float


def recipe_for(node: NodeSpec, parent: VersionInfo | None, datasets: dict[str, str], extra: dict) -> dict:
    return {
        "node": node.path,
        "method": node.method,
        "config": get(node.method).recipe_config(node.config),
        "parent": parent.id if parent else None,
        "datasets": datasets,
        "tokenizer": parent.row.tokenizer if parent else None,
        **({"inputs": extra} if extra else {}),
    }


def spec_curations(spec: TreeSpec, work_dir, executor=None, reporter: Reporter | None = None) -> dict[str, Curation]:
    """Each declared dataset's curation, its work directory named by its inputs and options (nothing read yet)."""
    out = {}
    for name, d in spec.datasets.items():
        try:
            out[name] = curation_for(list(d.paths), d.options, work_dir, executor=executor, reporter=reporter)
        except StemmaError as e:
            raise type(e)(f"dataset {name}: {e}") from None
    return out


def prepare_spec_datasets(spec: TreeSpec, work_dir, executor=None, reporter: Reporter | None = None,
                          curations: dict[str, Curation] | None = None) -> dict[str, BuiltDataset]:
    """Read, curate and split every dataset the spec declares into ``work_dir`` (nothing is registered yet).

    Two phases: every dataset is read first, so that each one's curation can use the test documents of all of them
    as evaluation data (a training document that near-duplicates any test document of the tree is leakage)."""
    if curations is None:
        curations = spec_curations(spec, work_dir, executor=executor, reporter=reporter)
    for name, cur in curations.items():
        try:
            cur.read()
        except StemmaError as e:
            raise type(e)(f"dataset {name}: {e}") from None
    references = tuple(sorted({c.read().test_path for c in curations.values()}))
    built = {}
    for name, cur in curations.items():
        try:
            built[name] = built_from(cur.opts, cur, references)
        except StemmaError as e:
            raise type(e)(f"dataset {name}: {e}") from None
    return built


def build(ws: Workspace, spec: TreeSpec, reporter: Reporter | None = None, only: list[str] | None = None,
          evaluate: bool = True, footprint: bool = False, executor=None) -> list[BuildEvent]:
    """Reconcile the registry to ``spec``; with ``footprint``, measure each version's footprint once per runtime
    (a child process per version and format: disk, peak memory, tokens/s; see `stemma.footprint`). ``executor``
    runs the datasets' curation (`stemma.data.curate.pipeline.make_executor`; one local process by default)."""
    reporter = reporter or NullReporter()
    events: list[BuildEvent] = []
    targets = set(spec.order)
    if only:
        for o in only:
            if o not in spec.nodes:
                raise StemmaError(f"unknown node {o!r} in {spec.name}")
        targets = set()
        for o in only:  # a node needs its ancestors built
            cur: str | None = o
            while cur:
                targets.add(cur)
                cur = spec.nodes[cur].parent
    # Pre-flight: everything that can fail on bad input fails here, before the first write.
    if evaluate:
        from .evaluate.runner import preflight

        preflight(ws, spec, targets)  # tasks the tree's tokenizer cannot run
    inputs: dict[str, dict] = {}  # cheap checks (checkpoints' formats and hashes) before any curation
    for path in spec.order:
        if path in targets:
            node = spec.nodes[path]
            inputs[path] = get(node.method).recipe_inputs(node.config, spec.root_dir)
    preflight_shapes(spec, targets)
    distributed.preflight(spec, targets, distributed.build_world())  # batches the build's processes can share
    curations = spec_curations(spec, ws.settings.work_dir / "curate", executor=executor, reporter=reporter)
    ds_ids: dict[str, str] = {}
    # Builders of one tree curate the same corpora in the same work directories (one of them reads the others' test
    # documents): one builder at a time, and the directories stay until their datasets are registered.
    with ws.curation_lock(curations.values(), log=reporter.log):
        prepared = prepare_spec_datasets(spec, ws.settings.work_dir / "curate", curations=curations)
        for path in spec.order:
            if path not in targets:
                continue
            node = spec.nodes[path]
            if node.dataset and node.dataset not in prepared:
                ws.resolve_dataset(node.dataset)
        for name, b in prepared.items():
            row, new = ws.register_dataset(b)
            if new:
                reporter.log(f"dataset {name}: ingested {row.n_docs} documents as {row.id[:12]}")
            ds_ids[name] = row.id
        for cur in curations.values():  # registered: the curation's work directories are no longer needed
            shutil.rmtree(cur.work, ignore_errors=True)
    built: dict[str, VersionInfo] = {}
    evaluator = Evaluator(ws, reporter)
    for path in spec.order:  # parents first, one node's lock at a time: builders never wait for each other in a cycle
        if path not in targets:
            continue
        node = spec.nodes[path]
        t0 = time.perf_counter()
        with ws.node_lock(path, "build", log=reporter.log):
            v, action = _reconcile(ws, spec, node, built, ds_ids, inputs[path], reporter)
            ws.set_gate(path, dataclasses.asdict(node.gate) if node.gate is not None else None)
            record_tasks(ws, path, spec.suites, node.eval, node.release_gate)
            if evaluate:
                evaluator.evaluate_version(v)
                evaluate_tasks(ws, v, reporter)  # the node's tasks, its parent on them, it on the parent's
            if footprint:
                _footprint(ws, path, v, action, reporter)
        built[path] = v
        events.append(BuildEvent(path, action, v.id, time.perf_counter() - t0))
    return events


def _reconcile(ws: Workspace, spec: TreeSpec, node: NodeSpec, built: dict[str, VersionInfo], ds_ids: dict[str, str],
               inputs: dict, reporter: Reporter) -> tuple[VersionInfo, str]:
    """The node's version for its recipe: the registered one (another builder may have published it while this one
    waited for the node's lock), or a new one built now. Runs under the node's lock."""
    parent = built[node.parent] if node.parent else None
    datasets: dict[str, str] = {}
    if node.dataset:
        datasets["train"] = ds_ids.get(node.dataset) or ws.resolve_dataset(node.dataset).id
    if parent is not None:
        pds = ws.version_datasets(parent.id).get("train")
        if pds:
            datasets["replay"] = pds
    recipe = recipe_for(node, parent, datasets, inputs)
    key = sha256_bytes(canonical_json(recipe))
    existing = ws.find_by_recipe(node.path, key)
    if existing is not None:
        # Accepted updates sit on top of the version the recipe made: keep the newest of them.
        head = ws.update_head(node.path, existing.id)
        ws.set_current(node.path, head, node.layer, node.parent)
        return ws.version(head), "reused" if head == existing.id else "reused (updated)"
    old = _rebase_source(ws, node, recipe, parent)
    v = _run(ws, spec, node, get(node.method), parent, datasets, recipe, key, reporter, rebase_from=old)
    return v, "rebased" if old is not None else "built"


def _footprint(ws: Workspace, path: str, v: VersionInfo, action: str, reporter: Reporter) -> None:
    """Measure the version's footprints once per runtime (stored as metrics; a child process each)."""
    from .footprint import ensure, ensure_llamacpp

    fp = ensure(ws, v.id)
    gg = ensure_llamacpp(ws, v.id)  # each GGUF type in llama.cpp, where llama-cpp-python imports
    if action == "built":
        q8 = gg.get("q8_0") if isinstance(gg, dict) else None
        reporter.log(f"{path}: {fp.rss_generate_bytes / 2**20:.0f} MiB peak to generate, "
                     f"{fp.tokens_per_s:.0f} tokens/s" + (
                         f"; llama.cpp q8_0: {q8.rss_generate_bytes / 2**20:.0f} MiB, "
                         f"{q8.tokens_per_s:.0f} tokens/s" if q8 else ""))


def preflight_shapes(spec: TreeSpec, targets: set[str]) -> None:
    """What each node will build, from the spec alone, parents first (`BuildMethod.plan`): a student larger than
    its teacher allows, a LoRA rank beyond the layers' width or targets the model lacks, an adapter or a variant of a
    compressed variant... are refused here with one line, before any dataset is curated or any node trained."""
    planned: dict[str, Planned] = {}
    for path in spec.order:
        if path not in targets:
            continue
        node = spec.nodes[path]
        parent = planned.get(node.parent) if node.parent else None
        planned[path] = get(node.method).plan(node.config, parent, spec, node)


def _rebase_source(ws: Workspace, node: NodeSpec, recipe: dict, parent: VersionInfo | None) -> VersionInfo | None:
    """The node's current version, when the node rebases and only its parent changed since it was built."""
    from .update.rebase import comparable

    if node.on_parent_update != "rebase" or parent is None:
        return None
    n = ws.node(node.path)
    if n is None or not n.current_version:
        return None
    old = ws.version(n.current_version)
    if old.row.relation != "adapter" or old.row.parent_id == parent.id:
        return None
    if comparable(old.manifest["recipe"]) != comparable(recipe) or old.row.tokenizer != parent.row.tokenizer:
        return None
    return old


def _run(ws: Workspace, spec: TreeSpec, node: NodeSpec, method, parent: VersionInfo | None,
         datasets: dict[str, str], recipe: dict, key: str, reporter: Reporter,
         rebase_from: VersionInfo | None = None) -> VersionInfo:
    work = ws.work_dir_for(key)
    # A data-parallel method trains with the build's processes (`stemma.distributed`); a rebase runs here alone.
    world = distributed.ONE if rebase_from is not None else distributed.announce(
        method, node.path, parent.id if parent else None, datasets, key)
    ctx = BuildContext(ws=ws, node=node.path, spec_dir=spec.root_dir, parent=parent, dataset_id=datasets.get("train"),
                       replay_dataset_id=datasets.get("replay"), work_dir=work, reporter=reporter, world=world)
    if parent is not None and parent.row.tokenizer != ws.version(parent.id).row.tokenizer:  # pragma: no cover
        raise StemmaError(f"node {node.path}: parent tokenizer changed during the build")
    if rebase_from is not None:
        from .update.rebase import run_rebase

        out = run_rebase(ctx, node.config, node.rebase, rebase_from)
    else:
        out = method.run(ctx, node.config)
    relation = method.relation_for(node.config)
    needs_same_tokenizer = relation in ("adapter", "merge", "update")
    if parent is not None and needs_same_tokenizer and out.tokenizer != parent.row.tokenizer:
        from .errors import TokenizerMismatchError

        raise TokenizerMismatchError(f"node {node.path}: {relation} needs the parent's tokenizer "
                                     f"({parent.row.tokenizer[:12]}), got {out.tokenizer[:12]}")
    files = {name: ws.store.put_bytes(data) for name, data in sorted(out.files.items())}
    manifest = {
        "kind": "version",
        "schema": 1,
        "node": node.path,
        "layer": node.layer,
        "relation": relation,
        "method": node.method,
        "parent": parent.id if parent else None,
        "base": parent.id if (parent is not None and relation == "adapter") else None,
        "recipe": recipe,
        "recipe_key": key,
        "tokenizer": out.tokenizer,
        "files": files,
        "architecture": out.architecture,
        "params": out.params,
        "own_params": out.own_params,
        "train": out.train,
        **({"scan": out.scan} if out.scan is not None else {}),
    }
    v = ws.register_version(manifest, layer=node.layer, parent_path=node.parent, datasets=datasets,
                            params=out.params, own_params=out.own_params)
    for name, (value, details) in out.metrics.items():  # measured during training on the method's held-out inputs
        ws.put_metric(v.id, name, None, "heldout", value, details)
    shutil.rmtree(work, ignore_errors=True)
    reporter.log(f"[green]built[/green] {node.path} -> {v.short} ({out.own_params:,} own parameters)")
    return v


def clean_work(ws: Workspace) -> int:
    """Remove checkpoints of builds whose recipes are already registered."""
    n = 0
    root = ws.settings.work_dir
    if not root.exists():
        return 0
    for d in root.iterdir():
        if d.is_dir():
            from sqlalchemy import select

            from .registry.tables import Version

            with ws.db.session() as s:
                if s.scalar(select(Version.id).where(Version.recipe_key == d.name)):
                    shutil.rmtree(d, ignore_errors=True)
                    n += 1
    return n


