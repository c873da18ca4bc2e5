"""lm-evaluation-harness on a version: the field's own evaluator, run on stemma's exported model, offline.

`run_harness` exports the version through `stemma.export` into a temporary directory (a full version merged; an
adapter version as its PEFT adapter plus ``base/``, handed to lm-eval's ``hf`` model as ``peft=``), runs
``lm_eval.simple_evaluate`` with a ``TaskManager`` over local task YAMLs in a child process (``python -m
stemma.evaluate.harness``) and stores every score lm-eval reports as a metric of the version, like stemma's own:

    name     harness:<task>/<metric>          (e.g. ``harness:manpage-name/chrf``)
    dataset  none
    split    the split lm-eval evaluated (``test``, ``validation``)
    details  lm-eval's version, the task's config hash and sample hash, samples evaluated (and of how many),
             stderr, limit, batch size, seconds

Why a child process: the Hugging Face libraries read ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` once, when they are
imported, and in the calling process they may already be imported under the user's settings; a fresh interpreter
with the switches forced on is the one way to be sure nothing reaches for the network. lm-eval also installs its
own logging and caches, which stay in the child.

The task YAML stemma ships for its demo tree (``examples/demo/harness/manpage-name.yaml``) asks what stemma's own
``generation`` task ``manpage-name`` asks, row for row, so the two give the same continuations and scores (its header
says how; `tests/evaluate/test_harness.py` checks it). What has to agree for that: the prompt as stored (no
template rendering), no BOS token added (stemma's tokenizer has none to add), prompts cut from the left to leave
room for the new tokens in the model's context, greedy decoding, the stop strings and the end-of-text token (the
exported config's ``eos_token_id`` is the tokenizer's end-of-text), whitespace cleaning of outputs and references,
and sacrebleu's corpus chrF / BLEU with default settings. lm-eval keeps decoding every row of a batch until the last
one stops and cuts each at its first stop string afterwards; the text is the same.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..errors import StemmaError

LM_EVAL_VERSION = "0.4.13"
"""The lm-eval release this bridge is written against (its ``simple_evaluate`` / ``TaskManager`` API)."""
INSTALL_HINT = f"pip install 'lm-eval[hf]=={LM_EVAL_VERSION}'"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_EVALUATE_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
"""Set in the child before anything imports the Hugging Face libraries: nothing is downloaded."""
METRIC_PREFIX = "harness:"
MAX_METRIC_NAME = 64
"""The registry's metric names are at most 64 characters (``metrics.name``)."""


def metric_name(task: str, metric: str) -> str:
    return f"{METRIC_PREFIX}{task}/{metric}"


def check_available() -> None:
    """Refuse, in one line, when lm-eval is not installed (before anything is exported)."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        raise StemmaError(f"--harness needs the package lm-eval: {INSTALL_HINT}")


def model_args_for(ws, version_id: str, into: Path) -> dict[str, str]:
    """Export a version under ``into`` and return lm-eval ``hf`` model arguments that load it.

    A full version (or a compressed variant, expanded) is exported merged: ``pretrained=DIR``. An adapter version
    is exported as its PEFT adapter over the model it applies to: ``pretrained=DIR/base, peft=DIR`` — how
    lm-eval users evaluate a LoRA, and the adapter stays unmerged as they would run it.
    """
    from ..export import export
    from ..lineage import ADAPTER

    plan = ws.plan(version_id)
    if plan.kind == ADAPTER:
        out = export(ws, version_id, into / "adapter", fmt="adapter")
        return {"pretrained": str(out / "base"), "peft": str(out), "tokenizer": str(out / "base")}
    out = export(ws, version_id, into / "merged", fmt="merged")
    return {"pretrained": str(out), "tokenizer": str(out)}


def run_harness(ws, version_ref: str, tasks: list[str], include_path: Path | None = None, limit: int | None = None,
                batch_size: int = 16, timeout: float | None = None) -> dict[str, float]:
    """Run lm-eval's tasks on a version (offline, on CPU) and store the scores as metrics of the version.

    Args:
        ws: the workspace.
        version_ref: a node (its current version), ``node@idprefix`` or a version id prefix.
        tasks: lm-eval task (or group) names; with ``include_path``, found only among the YAMLs there (indexing
            lm-eval's thousands of built-in tasks takes ~25 s, and they download their data, which this offline
            run cannot do); without it, among lm-eval's built-in tasks (whose data must already be cached).
        include_path: a directory of lm-eval task YAMLs (``--include_path``).
        limit: evaluate only the first ``limit`` samples of each task (the stored details say how many).
        batch_size: lm-eval's ``hf`` batch size (lm-eval's own default is 1).
        timeout: seconds the child process may take (None: no limit).

    Returns:
        ``{"harness:<task>/<metric>": value}`` for every score stored.

    Raises:
        StemmaError: lm-eval missing, no tasks, a missing include path, an unknown task, a failed run (one line;
            nothing is stored).
    """
    tasks = [t.strip() for t in tasks if t and t.strip()]
    if not tasks:
        raise StemmaError("--harness needs at least one lm-eval task name")
    if include_path is not None:
        include_path = Path(include_path).absolute()
        if not include_path.is_dir():
            raise StemmaError(f"lm-eval include path {include_path}: no such directory")
    if limit is not None and limit < 1:
        raise StemmaError("--limit must be >= 1")
    if batch_size < 1:
        raise StemmaError("--batch-size must be >= 1")
    check_available()
    v = ws.resolve_version(version_ref)
    with tempfile.TemporaryDirectory(prefix="stemma-harness-") as d:
        d = Path(d)
        model_args = model_args_for(ws, v.id, d)
        request = {"tasks": tasks, "include_path": str(include_path) if include_path else None,
                   "model_args": model_args, "limit": limit, "batch_size": batch_size}
        got = _child(d, request, timeout)  # unknown tasks are refused before the model loads
    rows = metrics_of(got)
    if not rows:
        raise StemmaError(f"lm-eval reported no numeric score for {', '.join(tasks)}")
    for name, *_ in rows:
        if len(name) > MAX_METRIC_NAME:
            raise StemmaError(f"metric name {name!r} is longer than {MAX_METRIC_NAME} characters; "
                              f"give the lm-eval task a shorter name")
    common = {"lm_eval": got["lm_eval"], "model_args": sorted(model_args), "limit": limit, "batch_size": batch_size,
              "include_path": str(include_path) if include_path else None, "seconds": got["seconds"]}
    out: dict[str, float] = {}
    for name, split, value, details in rows:
        ws.put_metric(v.id, name, None, split, value, details={**common, **details})
        out[name] = value
    return out


def metrics_of(got: dict[str, Any]) -> list[tuple[str, str, float, dict]]:
    """(metric name, split, value, details) for every numeric score in an lm-eval result.

    lm-eval keys scores ``<metric>,<filter>``; the filter is kept in the name (``<metric>@<filter>``) only when a
    task reports the same metric under several filters.
    """
    rows = []
    for task, scores in got["results"].items():
        keys = [k for k, val in scores.items() if "," in k and "_stderr," not in k and _number(val)]
        per_metric: dict[str, int] = {}
        for k in keys:
            per_metric[k.split(",", 1)[0]] = per_metric.get(k.split(",", 1)[0], 0) + 1
        cfg = got["configs"].get(task, {})
        n = got["n_samples"].get(task, {})
        split = cfg.get("test_split") or cfg.get("validation_split") or "test"
        for k in keys:
            metric, filt = k.split(",", 1)
            name = metric_name(task, metric if per_metric[metric] == 1 else f"{metric}@{filt}")
            stderr = scores.get(f"{metric}_stderr,{filt}")
            details = {"task": task, "metric": metric, "filter": filt,
                       "config_hash": got["config_hashes"].get(task), "sample_hash": got["task_hashes"].get(task),
                       "samples": n.get("effective"), "samples_total": n.get("original"),
                       "higher_is_better": got["higher_is_better"].get(task, {}).get(metric),
                       "stderr": float(stderr) if _number(stderr) else None,
                       "examples": (got.get("outputs") or {}).get(task, [])[:3]}
            rows.append((name, str(split)[:16], float(scores[k]), details))
    return rows


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _child(d: Path, request: dict, timeout: float | None) -> dict:
    """Run one request in a fresh interpreter (offline); its one-line error becomes a StemmaError."""
    req, out = d / "request.json", d / "result.json"
    req.write_text(json.dumps({**request, "out": str(out)}))
    env = {**os.environ, **OFFLINE_ENV}
    try:
        # The caller's working directory: task YAMLs with relative ``data_files`` resolve as under `lm_eval` itself.
        p = subprocess.run([sys.executable, "-m", "stemma.evaluate.harness", str(req)], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StemmaError(f"lm-eval did not finish in {timeout:.0f} s") from None
    if p.returncode != 0:
        lines = [x for x in p.stderr.strip().splitlines() if x.strip()]
        errors = [x for x in lines if x.startswith(_ERROR)]
        msg = errors[-1][len(_ERROR):] if errors else f"lm-eval failed: {lines[-1] if lines else p.returncode}"
        raise StemmaError(msg)
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------------- the child
_ERROR = "stemma-harness-error: "


class _Refused(Exception):
    """A one-line reason the child stops (reported to the parent as a StemmaError)."""


def task_manager(include_path: str | None):
    """lm-eval's TaskManager: only the include path's YAMLs when given (fast), else lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    if include_path:
        return TaskManager(include_path=include_path, include_defaults=False)
    return TaskManager()


def check_tasks(tm, tasks: list[str], include_path: str | None) -> None:
    known = set(tm.all_tasks)
    missing = [t for t in tasks if t not in known]
    if not missing:
        return
    if include_path:
        found = ", ".join(sorted(known)[:12]) or "none"
        raise _Refused(f"unknown lm-eval task {missing[0]!r}: not in {include_path} (tasks there: {found})")
    raise _Refused(f"unknown lm-eval task {missing[0]!r}: not one of lm-eval's built-in tasks; pass --include-path "
                   f"DIR for local task YAMLs")


def hf_model(model_args: dict[str, str], batch_size: int):
    """lm-eval's ``hf`` model on CPU in float32 (as stemma evaluates), from exported directories."""
    from lm_eval.models.huggingface import HFLM

    return HFLM(**model_args, batch_size=batch_size, device="cpu", dtype="float32")


def evaluate(lm, tasks: list[str], tm, limit: int | None = None, bootstrap_iters: int = 100) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` on a loaded model; returns what `metrics_of` reads (JSON-ready), each task's
    filtered outputs in sample order, and the seconds the evaluation took (model loading excluded).

    ``bootstrap_iters``: resamples for the stderr of corpus metrics (BLEU, chrF), where lm-eval itself caps them at
    100; means use closed forms. 0: no stderr.
    """
    import lm_eval

    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit, log_samples=True,
                                  bootstrap_iters=bootstrap_iters)
    seconds = time.perf_counter() - t0
    configs = {t: _jsonable(c) for t, c in (res.get("configs") or {}).items()}
    samples = res.get("samples") or {}
    return {
        "lm_eval": _dist_version(),
        "results": _jsonable(res["results"]),
        "configs": configs,
        "config_hashes": {t: config_hash(c) for t, c in configs.items()},
        "task_hashes": {t: sample_hash(s) for t, s in samples.items()},
        "n_samples": _jsonable(res.get("n-samples") or {}),
        "higher_is_better": _jsonable(res.get("higher_is_better") or {}),
        "outputs": {t: [_first(x.get("filtered_resps")) for x in sorted(s, key=lambda x: x["doc_id"])]
                    for t, s in samples.items()},
        "seconds": round(seconds, 3),
    }


def config_hash(cfg: dict) -> str:
    """sha256 of a task's config as lm-eval dumps it: functions by their source, where the YAML lies left out."""
    import re

    cfg = {**cfg, "metadata": {k: v for k, v in (cfg.get("metadata") or {}).items() if k != "config_source"}}
    text = re.sub(r" at 0x[0-9a-f]+", "", json.dumps(cfg, sort_keys=True, default=str))
    return hashlib.sha256(text.encode()).hexdigest()


def sample_hash(samples: list[dict]) -> str:
    """sha256 over what was asked: each sample's document, prompt and target hashes (lm-eval's own), in order."""
    h = hashlib.sha256()
    for x in sorted(samples, key=lambda x: x["doc_id"]):
        h.update(f"{x.get('doc_hash')}:{x.get('prompt_hash')}:{x.get('target_hash')}\n".encode())
    return h.hexdigest()


def _first(resps):
    if isinstance(resps, list):
        return _first(resps[0]) if resps else None
    return resps


def _dist_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


def _main(argv: list[str]) -> int:
    request = json.loads(Path(argv[0]).read_text())
    try:
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise _Refused(f"--harness needs the package lm-eval: {INSTALL_HINT}") from None
        tm = task_manager(request["include_path"])
        check_tasks(tm, request["tasks"], request["include_path"])
        lm = hf_model(request["model_args"], request["batch_size"])
        got = evaluate(lm, request["tasks"], tm, request["limit"])
        Path(request["out"]).write_text(json.dumps(got))
    except _Refused as e:
        print(_ERROR + str(e), file=sys.stderr)
        return 2
    except Exception as e:  # a task lm-eval cannot run (bad YAML, data it would download): the trace, then one line
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{_ERROR}lm-eval failed: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    for k, val in OFFLINE_ENV.items():
        os.environ.setdefault(k, val)
    sys.exit(_main(sys.argv[1:]))
