"""Updates through the registry: contributors, submission, aggregation rounds behind the gate, offers to siblings.

Order of every write is the workspace's: blobs first, then one registry transaction. A refused update is
stored nowhere (it is scanned and verified from memory before its blob is written). Refused at submission: a
file the scanner refuses (a pickle, flagged or not), a contributor not registered for the node or whose key was
revoked, a bad signature, a replay (the same file, or the same signed content in another file) of an update
already submitted, an update made against any version but the node's current one, a delta identical to another
contributor's against the same version (copies sent by colluding contributors), and anything that does not fit
that version.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from ..configs import GateConfig, make_gate
from ..errors import StemmaError, TokenizerMismatchError
from ..evaluate.evaluator import Evaluator
from ..progress import NullReporter, Reporter
from ..registry.db import is_conflict
from ..registry.tables import Contributor, Node, Round, Update, Version, VersionDataset
from ..settings import actor, when
from ..store import canonical_json, sha256_bytes
from ..workspace import VersionInfo, Workspace
from . import bundle, strategies
from .gate import Verdict, judge
from .keys import parse_public
from .keys import verify as verify_signature

# ---------------------------------------------------------------------------------------------- contributors


def register_contributor(ws: Workspace, node: str, name: str, public_key: str) -> Contributor:
    pub = parse_public(public_key)
    if not name or len(name) > 200 or any(c in name for c in "\n\r\t"):
        raise StemmaError("a contributor name is 1-200 printable characters")
    with ws.db.session() as s:
        if s.get(Node, node) is None:
            raise StemmaError(f"unknown node {node!r}; see `stemma tree`")
        row = s.scalar(select(Contributor).where(Contributor.node_path == node, Contributor.name == name))
        if row is not None:
            if row.public_key != pub:
                raise StemmaError(f"{name} is already registered for {node} with another key")
            if row.revoked_at is not None:
                raise StemmaError(f"{name}'s key for {node} was revoked ({row.revoked_reason}); it cannot come back")
            return row
        gone = s.scalar(select(Contributor).where(Contributor.node_path == node, Contributor.public_key == pub,
                                                  Contributor.revoked_at.is_not(None)))
        if gone is not None:
            raise StemmaError(f"that key was revoked for {node} (as {gone.name}: {gone.revoked_reason}); refused")
        row = Contributor(node_path=node, name=name, public_key=pub)
        s.add(row)
    return row


def revoke(ws: Workspace, node: str, name: str, reason: str, by: str | None = None) -> Contributor:
    """Revoke a contributor's key for a node: recorded (when, by whom, why), never deleted. From then on its
    updates are refused at submission (`submit` re-reads the key, locked, in the transaction that stores an
    update), and the ones still pending are marked ``revoked`` in the same transaction. A round still leaves out,
    and says so, pending updates of a revoked key, which registries from before revocations marked them hold."""

    reason = " ".join(reason.split())
    if not reason or len(reason) > 2000:
        raise StemmaError("a revocation needs a reason of 1-2000 characters")
    with ws.db.session() as s:
        row = s.scalar(select(Contributor).where(Contributor.node_path == node, Contributor.name == name))
        if row is None:
            raise StemmaError(f"{name!r} is not a contributor of {node}; see `stemma update contributors`")
        if row.revoked_at is not None:
            raise StemmaError(f"{name}'s key for {node} was already revoked {when(row.revoked_at)} by "
                              f"{row.revoked_by} ({row.revoked_reason})")
        row.revoked_at, row.revoked_by, row.revoked_reason = datetime.now(UTC), by or actor(), reason
        for u in s.scalars(select(Update).where(Update.contributor_id == row.id, Update.status == "pending")
                           .with_for_update()):
            u.status = "revoked"
    return row


def contributors(ws: Workspace, node: str | None = None) -> list[Contributor]:
    with ws.db.session() as s:
        q = select(Contributor).order_by(Contributor.node_path, Contributor.name)
        if node:
            q = q.where(Contributor.node_path == node)
        return list(s.scalars(q))


# ---------------------------------------------------------------------------------------------- verification

_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}


def model_shapes(ws: Workspace, version_id: str) -> dict[str, tuple[int, ...]]:
    if version_id not in _SHAPES:
        _SHAPES[version_id] = {k: tuple(v.shape) for k, v in ws.load_model(version_id).state_dict().items()}
    return _SHAPES[version_id]


def verify(ws: Workspace, upd: bundle.UpdateFile) -> tuple[VersionInfo, Contributor]:
    """Check an update against the registry; raise a one-line `StemmaError` on the first problem."""
    h = upd.header
    node = h["node"]
    with ws.db.session() as s:
        contributor = s.scalar(select(Contributor).where(Contributor.node_path == node,
                                                         Contributor.name == h["contributor"]))
        version = s.get(Version, h["parent"])
    if contributor is None:
        raise StemmaError(f"contributor {h['contributor']!r} is not registered for node {node}; refused")
    _refuse_revoked(contributor)
    verify_signature(contributor.public_key, upd.signature, upd.digest)
    if version is None:
        raise StemmaError(f"update names parent version {h['parent'][:12]}, which is not in the registry; refused")
    if version.node_path != node:
        raise StemmaError(f"update names version {h['parent'][:12]} of {version.node_path}, not of {node}; refused")
    _refuse_replay(ws, upd, contributor)
    current = ws.node(node).current_version
    if version.id != current:
        raise StemmaError(f"update was made against {node}@{version.id[:12]}, but {node} has moved on to "
                          f"{(current or '?')[:12]}; train it again against the current version; refused")
    _refuse_copy(ws, upd, contributor)
    if h["tokenizer"] != version.tokenizer:
        raise TokenizerMismatchError(f"update was made with tokenizer {h['tokenizer'][:12]}, {node}@"
                                     f"{version.id[:12]} uses {version.tokenizer[:12]}; refused")
    shapes = model_shapes(ws, version.id)
    for name, t in upd.delta.items():
        if name not in shapes:
            raise StemmaError(f"update changes {name!r}, which {node} does not have; refused")
        if tuple(t.shape) != shapes[name]:
            raise StemmaError(f"update's {name} has shape {tuple(t.shape)}, {node} has {shapes[name]}; refused")
    if upd.heldout is not None and upd.heldout.numel():
        vocab = ws.tokenizer(version.tokenizer).get_vocab_size()
        if int(upd.heldout.min()) < 0 or int(upd.heldout.max()) >= vocab:
            raise StemmaError(f"update's held-out ids fall outside the vocabulary of {vocab}; refused")
    return ws.version(version.id), contributor


def _refuse_revoked(c: Contributor) -> None:
    if c.revoked_at is not None:
        raise StemmaError(f"{c.name}'s key for {c.node_path} was revoked {when(c.revoked_at)} by {c.revoked_by} "
                          f"({c.revoked_reason}); refused")


def _refuse_replay(ws: Workspace, upd: bundle.UpdateFile, contributor: Contributor) -> None:
    """An update already submitted comes back: the same file, or its signed content in another container (the
    signature covers the header and the tensors, not the file's bytes, so the file's hash alone would miss it)."""
    digest = upd.digest.hex()
    with ws.db.session() as s:
        seen = s.get(Update, upd.id)
        if seen is None:
            for row in s.scalars(select(Update).where(Update.contributor_id == contributor.id)):
                received = row.header.get("received") or {}
                if received.get("digest") == digest or (
                        "digest" not in received and {k: v for k, v in row.header.items() if k != "received"}
                        == upd.header):
                    seen = row
                    break
    if seen is not None:
        state = {"pending": "waiting for a round", "used": f"used in round {(seen.round_id or '?')[:12]}",
                 "excluded": f"left out of round {(seen.round_id or '?')[:12]}",
                 "revoked": "its key was revoked"}.get(seen.status, seen.status)
        same = "this file" if seen.id == upd.id else "its signed content"
        raise StemmaError(f"replay: {same} was already submitted as update {seen.id[:12]} by {contributor.name} "
                          f"({state}); refused")


def _refuse_copy(ws: Workspace, upd: bundle.UpdateFile, contributor: Contributor) -> None:
    """The same delta from two contributors against one version: honest devices training on their own data never
    send bit-identical deltas; Sybils sharing one poisoned update do (each copy would count again)."""
    digest = upd.delta_digest.hex()
    with ws.db.session() as s:
        for row in s.scalars(select(Update).where(Update.node_path == upd.header["node"],
                                                  Update.parent_id == upd.header["parent"],
                                                  Update.contributor_id != contributor.id)):
            if (row.header.get("received") or {}).get("delta_digest") == digest:
                other = s.get(Contributor, row.contributor_id)
                raise StemmaError(f"{contributor.name}'s delta is identical to update {row.id[:12]} from "
                                  f"{other.name} against the same version (copies from colluding contributors); "
                                  "refused")


def submit(ws: Workspace, raw: bytes, source: str = "update") -> Update:
    """Scan, verify and store an update; its record keeps the signed header, the signed digest and the scan."""
    upd = bundle.decode(raw, source)
    version, contributor = verify(ws, upd)
    received = {"digest": upd.digest.hex(), "delta_digest": upd.delta_digest.hex(), "scan": upd.scan}
    row = Update(id=upd.id, node_path=version.row.node_path, parent_id=version.id,
                 contributor_id=contributor.id, kind=upd.header["kind"], n_examples=upd.header["n_examples"],
                 n_tokens=upd.header["n_tokens"], header={**upd.header, "received": received}, status="pending")
    try:
        with ws.db.session() as s:
            s.add(row)
            s.flush()
            # The key again, after the insert and locked, in the same transaction: a revocation committed since
            # `verify` refuses the update, and one that comes later waits for this transaction and then marks the
            # update revoked with the key's other pending ones. (On SQLite the insert holds the write lock, so no
            # revocation commits in between.)
            key = s.scalar(select(Contributor).where(Contributor.id == contributor.id).with_for_update())
            _refuse_revoked(key)
            digest = ws.store.put_bytes(raw)  # before the commit: the registry never names a missing blob
            assert digest == upd.id
    except DBAPIError as e:  # the same file, submitted twice at once: the second insert loses
        if not is_conflict(e):
            raise
        raise StemmaError(f"replay: {source} was submitted by another process at the same time") from None
    return row


def stored_file(ws: Workspace, row: Update) -> bundle.UpdateFile:
    """A submitted update read back from the store, with the scan recorded when it was received."""
    return bundle.decode(ws.store.get_bytes(row.id), row.id[:12], scan=(row.header.get("received") or {}).get("scan"))


def updates(ws: Workspace, node: str, status: str | None = None) -> list[Update]:
    with ws.db.session() as s:
        q = select(Update).where(Update.node_path == node).order_by(Update.created_at)
        if status:
            q = q.where(Update.status == status)
        return list(s.scalars(q))


def rounds(ws: Workspace, node: str | None = None) -> list[Round]:
    with ws.db.session() as s:
        q = select(Round).order_by(Round.created_at)
        if node:
            q = q.where(Round.node_path == node)
        return list(s.scalars(q))


def gate_for(ws: Workspace, node: str) -> GateConfig:
    n = ws.node(node)
    if n is None:
        raise StemmaError(f"unknown node {node!r}; see `stemma tree`")
    return make_gate(n.gate, f"gate of {node}")


# ---------------------------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    files: dict[str, bytes]
    model: Any
    architecture: dict[str, Any]
    own_params: int
    params: int
    info: dict[str, Any]


def _adapter_candidate(ws: Workspace, parent: VersionInfo, delta: dict[str, torch.Tensor], rank: int) -> Candidate:
    """Fold a dense delta into an adapter version: its adapter plus a truncated SVD of the delta, ranks stacked.

    With ``A = [A_old; A_new]`` and ``B = [s B_old, B_new]`` at scale 1 the stored adapter is the old one plus the
    rank-``rank`` best approximation (Eckart-Young) of the delta on each adapted weight; the share of the delta's
    energy this keeps is reported. Weights the adapter does not adapt cannot carry a change and are reported too.
    """
    from ..models.io import apply_adapter, materialise

    cfg = json.loads(ws.store.get_bytes(parent.manifest["files"]["adapter_config.json"]))
    old = st_load(ws.store.get_bytes(parent.manifest["files"]["adapter_model.safetensors"]))
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern") or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise StemmaError(f"{parent.row.node_path}: updates support plain LoRA adapters only")
    r_old = int(cfg["r"])
    scale = float(cfg["lora_alpha"]) / r_old
    k = rank or r_old
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
    modules = sorted({key[: -len(".lora_A.weight")] for key in old if key.endswith(".lora_A.weight")})
    new: dict[str, torch.Tensor] = {}
    kept_energy, total_energy, dropped = 0.0, 0.0, []
    prefix = "base_model.model."
    used = set()
    for mod in modules:
        a_old, b_old = old[f"{mod}.lora_A.weight"].float(), old[f"{mod}.lora_B.weight"].float()
        wkey = mod[len(prefix):] + ".weight" if mod.startswith(prefix) else mod + ".weight"
        d = delta.get(wkey)
        if d is None:
            a_new = torch.zeros(k, a_old.shape[1])
            b_new = torch.zeros(b_old.shape[0], k)
        else:
            used.add(wkey)
            m = d.float().T if fan_in_fan_out else d.float()  # [out, in]
            u, sv, vh = torch.linalg.svd(m, full_matrices=False)
            kk = min(k, sv.numel())
            total_energy += float((sv ** 2).sum())
            kept_energy += float((sv[:kk] ** 2).sum())
            root = sv[:kk].sqrt()
            b_new = torch.zeros(b_old.shape[0], k)
            a_new = torch.zeros(k, a_old.shape[1])
            b_new[:, :kk] = u[:, :kk] * root
            a_new[:kk] = root[:, None] * vh[:kk]
        new[f"{mod}.lora_A.weight"] = torch.cat([a_old, a_new]).contiguous()
        new[f"{mod}.lora_B.weight"] = torch.cat([b_old * scale, b_new], dim=1).contiguous()
    dropped = sorted(set(delta) - used)
    r_new = r_old + k
    cfg.update({"r": r_new, "lora_alpha": r_new})
    files = {"adapter_config.json": json.dumps(cfg, sort_keys=True, indent=2).encode(),
             "adapter_model.safetensors": st_save(new)}
    base = ws.load_model(parent.id, below=True)  # what the adapter applies to (past earlier updates of it)
    with tempfile.TemporaryDirectory(prefix="stemma-cand-") as d:
        paths = {}
        for name, data in files.items():
            Path(d, "src").mkdir(exist_ok=True)
            p = Path(d, "src", name)
            p.write_bytes(data)
            paths[name] = p
        model = apply_adapter(base, materialise(paths, Path(d, "adapter")), merge=True)
    arch = {**parent.manifest["architecture"]}
    arch["adapter"] = {**arch.get("adapter", {}), "r": r_new, "alpha": r_new}
    own = sum(t.numel() for t in new.values())
    info = {"adapter_rank": {"before": r_old, "after": r_new},
            "delta_energy_kept": (kept_energy / total_energy) if total_energy else 1.0,
            "dropped": dropped}
    return Candidate(files, model, arch, own, parent.row.params, info)


def make_candidate(ws: Workspace, parent: VersionInfo, delta: dict[str, torch.Tensor], gate: GateConfig) -> Candidate:
    from ..lineage import ADAPTER, VARIANT
    from ..models.io import save_model_files

    kind = ws.plan(parent.id).kind
    if kind == VARIANT:
        raise StemmaError(f"{parent.row.node_path} is a compressed variant; update its source and rebuild")
    if kind == ADAPTER:
        return _adapter_candidate(ws, parent, delta, gate.adapter_rank)
    model = ws.load_model(parent.id)
    sd = model.state_dict()
    with torch.no_grad():
        for k, d in delta.items():
            sd[k].add_(d.to(sd[k].dtype))
    out = save_model_files(model)
    return Candidate(out, model, dict(parent.manifest["architecture"]), parent.row.own_params, parent.row.params, {})


# ---------------------------------------------------------------------------------------------- evaluation


def _children_datasets(ws: Workspace, node: str) -> dict[str, str]:
    out = {}
    with ws.db.session() as s:
        kids = list(s.scalars(select(Node).where(Node.parent_path == node)))
        for k in kids:
            if not k.current_version:
                continue
            ds = s.scalar(select(VersionDataset.dataset_id).where(VersionDataset.version_id == k.current_version,
                                                                   VersionDataset.role == "train"))
            if ds:
                out[k.path] = ds
    return out


def _heldout_ids(upds: list[bundle.UpdateFile]) -> torch.Tensor | None:
    """Every contributor's held-out sample, each cut to the smallest one so none dominates."""
    parts = [u.heldout for u in upds if u.heldout is not None and u.heldout.numel() > 1]
    if not parts:
        return None
    n = min(p.numel() for p in parts)
    return torch.cat([p[:n] for p in parts])


def _gate(ws: Workspace, target: VersionInfo, cand: Candidate, heldout: torch.Tensor | None, n_contrib: int,
          gate: GateConfig, reporter: Reporter) -> Verdict:
    ev = Evaluator(ws, reporter, max_tokens=gate.eval_tokens)
    tok = target.row.tokenizer
    before_model = ws.load_model(target.id)
    node = target.row.node_path
    held = own = None
    if heldout is not None:
        held = (ev.model_ppl(before_model, heldout, f"{node}: held-out, before"),
                ev.model_ppl(cand.model, heldout, f"{node}: held-out, after"))
    own_ds = ws.version_datasets(target.id).get("train")
    if own_ds:
        own = (ev.model_ppl(before_model, ev.ids(tok, own_ds), f"{node}: own test, before"),
               ev.model_ppl(cand.model, ev.ids(tok, own_ds), f"{node}: own test, after"))
    kids = {}
    for child, ds in _children_datasets(ws, node).items():
        if ds == own_ds:
            continue
        kids[child] = (ev.model_ppl(before_model, ev.ids(tok, ds), f"{child}: test, before"),
                       ev.model_ppl(cand.model, ev.ids(tok, ds), f"{child}: test, after"))
    return judge(gate, n_contrib, held, own, kids)


# ---------------------------------------------------------------------------------------------- rounds


@dataclass
class RoundResult:
    round: Round
    verdict: Verdict
    version: VersionInfo | None


def _register_update_version(ws: Workspace, target: VersionInfo, cand: Candidate, round_id: str,
                             record: dict, also) -> VersionInfo:
    files = {name: ws.store.put_bytes(data) for name, data in sorted(cand.files.items())}
    recipe = {"node": target.row.node_path, "method": "update", "parent": target.id, "round": round_id,
              **{k: record[k] for k in ("strategy", "updates", "source_round") if k in record}}
    manifest = {
        "kind": "version", "schema": 1, "node": target.row.node_path, "layer": target.manifest.get("layer"),
        "relation": "update", "method": "update", "parent": target.id,
        "base": target.manifest.get("base"), "recipe": recipe, "recipe_key": sha256_bytes(canonical_json(recipe)),
        "tokenizer": target.row.tokenizer, "files": files, "architecture": cand.architecture,
        "params": cand.params, "own_params": cand.own_params, "train": {"round": round_id, **cand.info},
    }
    node = ws.node(target.row.node_path)
    datasets = ws.version_datasets(target.id)
    return ws.register_version(manifest, layer=node.layer, parent_path=node.parent_path, datasets=datasets,
                               params=cand.params, own_params=cand.own_params, also=also)


def run_round(ws: Workspace, target: VersionInfo, delta_updates: list[bundle.UpdateFile], update_ids: list[str],
              contributors_: list[str], gate: GateConfig, reporter: Reporter, *, strategy: str | None = None,
              strategy_config: dict | None = None, source_round: str | None = None,
              precomputed: tuple[dict[str, torch.Tensor], list[int], dict] | None = None,
              heldout: torch.Tensor | None = None, excluded: dict[str, str] | None = None) -> RoundResult:
    """Aggregate (or take ``precomputed``), build the candidate, judge it, record the round; register if accepted.

    ``excluded``: pending updates this round leaves out (update id -> why); they are marked ``excluded`` with the
    round, and the round's reasons say so."""
    excluded = excluded or {}
    name = strategy or gate.strategy
    params = strategy_config if strategy_config is not None else gate.strategy_config
    if precomputed is None:
        strat = strategies.get(name, params)
        weights = [float(u.header["n_examples"]) for u in delta_updates]
        res = strat.aggregate([u.delta for u in delta_updates], weights)
        delta, selected, info = res.delta, list(res.selected), dict(res.info)
    else:
        delta, selected, info = precomputed
    if gate.server_lr != 1.0:
        delta = {k: v * gate.server_lr for k, v in delta.items()}
    if heldout is None:
        heldout = _heldout_ids(delta_updates)
    cand = make_candidate(ws, target, delta, gate)
    verdict = _gate(ws, target, cand, heldout, len(set(contributors_)), gate, reporter)
    verdict.metrics["aggregate"] = {**info, "norm": bundle.delta_norm(delta), **cand.info}
    verdict.reasons.extend(f"left out update {uid[:12]}: {why}" for uid, why in sorted(excluded.items()))
    delta_blob = ws.store.put_bytes(st_save({k: v.contiguous() for k, v in delta.items()},
                                            metadata={"heldout": "1"} if heldout is not None else None))
    held_blob = ws.store.put_bytes(st_save({"ids": heldout})) if heldout is not None else None
    record = {"node": target.row.node_path, "parent": target.id, "strategy": name, "config": params,
              "updates": update_ids, "delta": delta_blob, "heldout": held_blob, "source_round": source_round,
              **({"excluded": sorted(excluded)} if excluded else {})}
    round_id = sha256_bytes(canonical_json(record))

    def record_round(s, version_id: str | None) -> Round:
        """The round and its updates' status, in the transaction that publishes its version (if any): a crash
        leaves both or neither. An update another round used meanwhile refuses the whole transaction."""
        row = s.get(Round, round_id)
        if row is None:
            row = Round(id=round_id, node_path=target.row.node_path, parent_id=target.id, source_round=source_round,
                        strategy=name,
                        config={"strategy": params, "gate": dataclasses.asdict(gate), "heldout": held_blob},
                        update_ids=update_ids, selected=[update_ids[i] for i in selected if i < len(update_ids)],
                        delta=delta_blob, accepted=verdict.accepted, reasons=verdict.reasons,
                        metrics=_jsonable(verdict.metrics), version_id=version_id)
            s.add(row)
        for uid in update_ids if source_round is None else []:  # an offer reuses its source round's updates
            u = s.get(Update, uid, with_for_update=True)
            if u is not None and u.status != "pending" and u.round_id != round_id:
                raise StemmaError(f"update {uid[:12]} was {u.status} by round {str(u.round_id)[:12]} meanwhile; "
                                  "this round is not recorded")
            if u is not None:
                u.status, u.round_id = "used", round_id
        for uid in excluded:
            u = s.get(Update, uid, with_for_update=True)
            if u is not None and u.status == "pending":
                u.status, u.round_id = "excluded", round_id
        return row

    version = None
    if verdict.accepted:
        version = _register_update_version(ws, target, cand, round_id, record, also=record_round)
        with ws.db.session() as s:
            row = s.get(Round, round_id)
        Evaluator(ws, reporter).evaluate_version(version)  # the numbers `stemma tree` shows
    else:
        row = ws.db.retrying(lambda s: record_round(s, None))
    return RoundResult(row, verdict, version)


def _jsonable(x):
    return json.loads(json.dumps(x, default=float))


def aggregate(ws: Workspace, node: str, reporter: Reporter | None = None, strategy: str | None = None,
              strategy_config: dict | None = None) -> RoundResult:
    """One round over the node's pending updates against its current version (the newest per contributor).

    Pending updates whose contributor's key has been revoked since they were submitted are left out, and the
    round's reasons say so."""
    reporter = reporter or NullReporter()
    gate = gate_for(ws, node)
    # One round at a time per node, and none while a build publishes it: the pending updates read here are the
    # ones the round marks used. Updates submitted meanwhile stay pending for the next round.
    with ws.node_lock(node, "aggregate", log=reporter.log):
        return _aggregate(ws, node, gate, reporter, strategy, strategy_config)


def _aggregate(ws: Workspace, node: str, gate: GateConfig, reporter: Reporter, strategy: str | None,
               strategy_config: dict | None) -> RoundResult:
    target = ws.resolve_version(node)
    people = {c.id: c for c in contributors(ws, node)}
    waiting = updates(ws, node, "pending")
    excluded = {u.id: f"{people[u.contributor_id].name}'s key was revoked ({people[u.contributor_id].revoked_reason})"
                for u in waiting if people[u.contributor_id].revoked_at is not None}
    live = [u for u in waiting if u.id not in excluded]
    pending = [u for u in live if u.parent_id == target.id]
    stale = [u for u in live if u.parent_id != target.id]
    if stale:
        reporter.log(f"{node}: {len(stale)} pending update(s) were made against an older version and wait for "
                     "their contributors to retrain")
    latest: dict[int, Update] = {}
    for u in pending:
        latest[u.contributor_id] = u
    chosen = sorted(latest.values(), key=lambda u: u.id)
    if not chosen:
        left_out = f" ({len(excluded)} from revoked keys left out)" if excluded else ""
        raise StemmaError(f"{node}: no pending updates against its current version {target.short}{left_out}")
    files = [stored_file(ws, u) for u in chosen]
    return run_round(ws, target, files, [u.id for u in chosen], [people[u.contributor_id].name for u in chosen],
                     gate, reporter, strategy=strategy, strategy_config=strategy_config, excluded=excluded)


def offer(ws: Workspace, round_id: str, sibling: str, reporter: Reporter | None = None) -> RoundResult:
    """Offer an accepted round's aggregate to a sibling node, judged by the sibling's own gate."""
    reporter = reporter or NullReporter()
    with ws.db.session() as s:
        rows = list(s.scalars(select(Round).where(Round.id.startswith(round_id))))
    if len(rows) != 1:
        raise StemmaError(f"unknown or ambiguous round {round_id!r}; see `stemma update rounds`")
    src = rows[0]
    if not src.accepted:
        raise StemmaError(f"round {src.id[:12]} was rejected; only an accepted aggregate can be offered")
    src_node, dst = ws.node(src.node_path), ws.node(sibling)
    if dst is None:
        raise StemmaError(f"unknown node {sibling!r}; see `stemma tree`")
    if sibling == src.node_path or dst.parent_path != src_node.parent_path:
        raise StemmaError(f"{sibling} is not a sibling of {src.node_path}")
    target = ws.resolve_version(sibling)
    origin = ws.version(src.parent_id)
    if target.row.tokenizer != origin.row.tokenizer:
        raise TokenizerMismatchError(f"{sibling} uses tokenizer {target.row.tokenizer[:12]}, the aggregate was made "
                                     f"with {origin.row.tokenizer[:12]}")
    delta = st_load(ws.store.get_bytes(src.delta))
    shapes = model_shapes(ws, target.id)
    for k, v in delta.items():
        if shapes.get(k) != tuple(v.shape):
            raise StemmaError(f"{sibling} has no weight {k} of shape {tuple(v.shape)}; the aggregate does not fit it")
    held_blob = (src.config or {}).get("heldout")
    heldout = st_load(ws.store.get_bytes(held_blob))["ids"] if held_blob else None
    gate = gate_for(ws, sibling)
    with ws.node_lock(sibling, "offer", log=reporter.log):
        if ws.resolve_version(sibling).id != target.id:
            raise StemmaError(f"{sibling} moved to another version meanwhile; offer the round again")
        return run_round(ws, target, [], list(src.update_ids), list(src.update_ids), gate, reporter,
                         strategy=src.strategy, strategy_config=(src.config or {}).get("strategy"), source_round=src.id,
                         precomputed=(delta, list(range(len(src.update_ids))), {"offered_from": src.node_path}),
                         heldout=heldout)
