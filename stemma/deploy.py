"""`stemma deploy vllm`: a base and its LoRA children laid out for ``vllm serve`` on a GPU machine.

vLLM serves one base model and, per request, one LoRA applied straight to that base. So the deployment of a
node is its merged export (`stemma.export.export`: a plain Hugging Face directory with the tokenizer) as
``base/``, and one PEFT adapter directory per version whose load plan is a single adapter applied directly on
that node's version, as ``adapters/<node path>/``. Clients name models as they do with `stemma serve`: the base by
its node path (``--served-model-name``), each adapter by its own node path (vLLM splits ``--lora-modules`` items at
``=`` and takes any other character in the name, slashes included).

Left out, each with its reason in the written README and in `Deployment.skipped`:

- an adapter stacked on another adapter (``en/software/python`` on ``en/software``): vLLM applies one LoRA to the
  base, and this one was trained on a model with its parent adapter merged. It is not rewritten as a combined
  LoRA; export it merged (`stemma export NODE`) and serve it as a model of its own;
- an adapter trained on another version of the node (stale until rebuilt);
- compressed variants (stemma's own quantised, low-rank and pruned formats): not LoRAs;
- full-weight children: bases of their own (``stemma deploy vllm CHILD``).

A node that is itself an adapter is refused, naming the base to deploy instead. Everything is written beside
``out`` and renamed into place (`stemma.store.staged_dir`), so a failure leaves nothing.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

from .errors import StemmaError
from .export import export, write_adapter
from .lineage import ADAPTER, FULL, VARIANT, LoadPlan
from .store import check_out_dir, staged_dir
from .workspace import Workspace

VLLM_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (its ``LoRAConfig``; releases before 0.5 stopped at 64)."""
NO_VLLM_LORA = frozenset({"gpt2"})
"""Model types whose vLLM implementation takes no LoRA (vLLM's ``GPT2LMHeadModel`` is not ``SupportsLoRA``, checked
against vLLM 0.11): their adapter directories are still written and load in peft, and the README says so."""


@dataclass(frozen=True)
class Deployment:
    """What `deploy_vllm` wrote."""

    out: Path
    base: str
    """The base's node path: its served model name."""
    adapters: dict[str, int]
    """Served LoRA name (the node path) -> its rank."""
    skipped: dict[str, str]
    """Node path -> why it is not served as a LoRA of this base."""
    max_lora_rank: int | None
    command: list[str]
    """``vllm serve`` with absolute paths into ``out``."""
    warning: str | None
    """A limit of vLLM for this base's family, or None."""


def vllm_max_rank(rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds ``rank``."""
    for r in VLLM_RANKS:
        if rank <= r:
            return r
    raise StemmaError(f"LoRA rank {rank} is beyond vLLM's largest --max-lora-rank ({VLLM_RANKS[-1]})")


def deploy_vllm(ws: Workspace, ref: str, out: Path, force: bool = False) -> Deployment:
    """Write ``ref``'s version and its LoRA children to ``out`` for ``vllm serve`` (see the module docstring).

    Raises:
        StemmaError: unknown node, a node that is an adapter, a non-empty ``out`` without ``force``, an ``out``
            vLLM's ``--lora-modules`` cannot name (``=`` or ``,`` in it), an adapter rank beyond vLLM's limit, or a
            corrupt blob (nothing is left in ``out``).
    """
    v = ws.resolve_version(ref)
    node = v.row.node_path
    plan = ws.plan(v.id)
    if plan.kind == ADAPTER:
        raise StemmaError(f"{node} is a LoRA adapter on {plan.base.node}; deploy {plan.base.node} instead (its LoRA "
                          "children, this one included, are served as adapters)")
    out = check_out_dir(out, force)
    if "=" in str(out) or "," in str(out):
        raise StemmaError(f"{out}: vLLM's --lora-modules cannot take a path with '=' or ','; choose another --out")
    served, skipped = _children(ws, node, plan)
    ranks = {n: _rank(ws, p) for n, p in served.items()}
    max_rank = vllm_max_rank(max(ranks.values())) if ranks else None
    family = plan.base.model_type
    warning = (f"vLLM's {family} model takes no LoRA adapters: `--enable-lora` fails there; serve the children "
               "merged (`stemma export NODE`) or with `stemma serve`") if served and family in NO_VLLM_LORA else None
    with staged_dir(out, force) as tmp:
        export(ws, v.id, tmp / "base")
        for name, p in served.items():
            write_adapter(ws, p, tmp / "adapters" / name, base="../" * (name.count("/") + 2) + "base")
        (tmp / "serve.sh").write_text(_script(node, ranks, max_rank))
        (tmp / "serve.sh").chmod(0o755)
        deployment = Deployment(out=out, base=node, adapters=ranks, skipped=skipped, max_lora_rank=max_rank,
                                command=_command(str(out), node, ranks, max_rank), warning=warning)
        (tmp / "README.md").write_text(_readme(deployment, v.label))
        (tmp / "stemma.json").write_text(json.dumps({
            "base": {"node": node, "version": v.id, "path": "base"},
            "adapters": [{"name": n, "node": n, "version": p.version.id, "path": f"adapters/{n}", "rank": ranks[n]}
                         for n, p in served.items()],
            "skipped": skipped,
            "max_lora_rank": max_rank,
        }, indent=2))
    return deployment


def _children(ws: Workspace, node: str, plan: LoadPlan) -> tuple[dict[str, LoadPlan], dict[str, str]]:
    """The plans of the adapters vLLM can serve on ``plan``'s version, by node path, and why each other child or
    adapter of ``node`` is not one of them."""
    served, skipped = {}, {}
    for n in ws.nodes():
        if n.path == node or n.current_version is None:
            continue
        p = ws.plan(n.current_version)
        if p.base.node != node and n.parent_path != node:
            continue
        if p.kind == ADAPTER and p.base.id == plan.version.id and len(p.adapters) == 1:
            served[n.path] = p
        elif p.kind == VARIANT:
            skipped[n.path] = "a compressed variant (stemma's own format), not a LoRA"
        elif p.kind == FULL:
            skipped[n.path] = f"full weights: a base of its own (`stemma deploy vllm {n.path}`)"
        elif p.base.id != plan.version.id:
            skipped[n.path] = f"a LoRA on {p.base.label}, not on the deployed {plan.version.label}; rebuild it"
        else:
            skipped[n.path] = (f"stacked on the adapter {p.adapters[-2].node}: vLLM applies one LoRA to the base; "
                               f"export it merged (`stemma export {n.path}`) and serve it as a model of its own")
    return served, skipped


def _rank(ws: Workspace, plan: LoadPlan) -> int:
    """An adapter's largest rank, from its stored PEFT config (``r`` and any per-module ``rank_pattern``)."""
    cfg = json.loads(ws.store.verified_path(plan.version.file("adapter_config.json")).read_text())
    return max([cfg["r"], *(cfg.get("rank_pattern") or {}).values()])


def _command(at: str, node: str, ranks: dict[str, int], max_rank: int | None) -> list[str]:
    """``vllm serve`` for the deployment in directory ``at``."""
    cmd = ["vllm", "serve", f"{at}/base", "--served-model-name", node]
    if ranks:
        cmd += ["--enable-lora", "--lora-modules", *(f"{n}={at}/adapters/{n}" for n in ranks),
                "--max-loras", str(len(ranks)), "--max-lora-rank", str(max_rank)]
    return cmd


def _script(node: str, ranks: dict[str, int], max_rank: int | None) -> str:
    """A shell script running the command from wherever the directory now lies; extra arguments go to vLLM."""
    cmd = shlex.join(_command("@HERE@", node, ranks, max_rank)).replace("@HERE@", '"$HERE"')
    return (f"#!/bin/sh\n# vllm serve {node} and its LoRA children\n"
            f'HERE=$(cd "$(dirname "$0")" && pwd)\nexec {cmd} "$@"\n')


def _readme(d: Deployment, label: str) -> str:
    """The deployment's README.md: what each directory is, the command, and what is not served and why."""
    lines = [f"# {d.base} for vLLM", "",
             f"`base/` is {label} merged: a plain Hugging Face model directory with its tokenizer.", ""]
    if d.adapters:
        lines += ["LoRA adapters (PEFT directories), each served under its node path:", ""]
        lines += [f"- `{n}`: `adapters/{n}/`, rank {r}" for n, r in d.adapters.items()]
    else:
        lines += ["No LoRA child applies directly to this version: the command serves the base alone."]
    lines += ["", "Run `./serve.sh` (extra arguments go to `vllm serve`), or:", "", "```",
              shlex.join(d.command), "```", "",
              f"Clients send `model: \"{d.base}\"` for the base and an adapter's node path for that adapter. "
              "`--max-loras` lets every adapter share a batch (lower it to save GPU memory); `--max-lora-rank` is the "
              "largest adapter rank rounded up to a value vLLM accepts.", ""]
    if d.warning:
        lines += [f"**Note:** {d.warning}.", ""]
    lines += ["Not served here (compressed variants are stemma's own formats, never LoRAs; an adapter stacked on "
              "another adapter is not one LoRA over this base):", ""]
    lines += [f"- `{n}`: {why}" for n, why in d.skipped.items()] or ["- nothing"]
    return "\n".join(lines) + "\n"
