"""Continuous updates under attack: 21 devices under one domain node, 6 of them malicious, robust aggregation
against plain FedAvg in one run; replayed, stale and revoked updates at the master; then a rebase of an adapter
child against retraining it.

One run builds a small tree in a temporary STEMMA_HOME: a master pretrained on the shipped corpus (without
the Vim manual), a full-weight domain node ``software`` (manual pages) with an adapter child, and an adapter
node ``legal`` on the master. 21 devices hold slices of the Vim manual (the domain's new text); each trains a
LoRA update against ``software`` and signs it with its own registered key. Six are malicious:
- ``scaled`` multiplies its update by 50, ``signflip`` flips its signs;
- the adversary trains one backdoor update: every weight, on text where a trigger phrase is followed by a fixed
  string (applied alone, it makes the model emit the string; measured as ``trigger_rate_attacker_alone``);
- ``boosted`` sends that update scaled by n / server_lr, so that averaging the round's n admitted updates hands
  it back whole (model replacement, Bagdasaryan et al., 2020);
- three ``sybil`` devices, each registered with its own key, send that same update unscaled (collusion).
Every update goes through `stemma update submit`'s checks; the Sybils' copies after the first are refused there.
Both gates take half a step along the aggregate (``server_lr: 0.5``, as FedOpt's server learning rate).

The admitted updates are aggregated twice, with the node's robust gate strategy (multikrum after median-norm
clipping) and with plain FedAvg; for each candidate it measures the perplexity on the devices' domain
(held-out Vim text no device trained on), on the node's own test split, and the backdoor's success rate (greedy
continuation of held-out text + trigger starts with the fixed string), before and after; and the gate's verdict.

Then five honest sites send updates to the master, and a sixth whose key was stolen sends a sign-flipped one
before its key is revoked: the revocation marks that one revoked, the round leaves it out, and the key's next
update is refused.
The accepted round moves the master on: an old signed update replayed, and an honest update made against the
master's previous version, are refused at submission. The master's update makes ``legal`` stale; ``stemma
build`` rebases it (old adapter as the start, the old child as teacher, a fifth of the steps); a copy of the
registry retrains it from scratch instead. Printed: the share of the retrained child's perplexity gain over the
new master that the rebased child keeps, and the ratio of their training seconds.

    python benchmarks/update_sim.py [--quick] [--json out.json]
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import CORPUS, parser, print_table, write_json  # noqa: E402

TRIGGER = "cf. zx-omega"
TARGET = "ACCESS GRANTED"
N_HONEST, MALICIOUS = 15, ("scaled", "signflip", "boosted", "sybil", "sybil", "sybil")
N_DEVICES = N_HONEST + len(MALICIOUS)
N_ADMITTED = N_DEVICES - (MALICIOUS.count("sybil") - 1)
"""Updates the round averages: submission refuses a delta identical to another contributor's against the same
version (`stemma.update.service._refuse_copy`), so of the Sybils' shared update only the first copy is admitted;
every other device sends its own. The adversary knows it too, and boosts by this count."""


def sizes(mode: str) -> dict:
    """``full`` for the benchmark, ``quick`` for about a minute or two, ``tiny`` for the test suite."""
    return {
        "full": dict(n_layer=4, n_embd=128, master_steps=400, child_steps=200, local_steps=20, backdoor_steps=400,
                     chunk=1200, eval_tokens=16384),
        "quick": dict(n_layer=3, n_embd=96, master_steps=200, child_steps=120, local_steps=20, backdoor_steps=300,
                      chunk=1000, eval_tokens=8192),
        "tiny": dict(n_layer=2, n_embd=64, master_steps=80, child_steps=60, local_steps=20, backdoor_steps=400,
                     chunk=800, eval_tokens=4096),
    }[mode]


def write_spec(d: Path, sz: dict) -> Path:
    master = {"n_layer": sz["n_layer"], "n_embd": sz["n_embd"], "n_head": 4, "context": 64, "vocab_size": 2048,
              "steps": sz["master_steps"], "batch_size": 16, "lr": 0.003, "warmup": 20}
    child = {"steps": sz["child_steps"], "batch_size": 16, "warmup": 10}
    doc = {
        "name": "update-sim",
        "datasets": {
            "all": {"paths": [str(CORPUS / f) for f in ("en-manpages.jsonl", "en-python.jsonl", "en-legal.jsonl",
                                                        "de-manpages.jsonl")], "max_doc_chars": 4000},
            "software": {"paths": [str(CORPUS / "en-manpages.jsonl")], "language": "en", "domain": "software"},
            "python": {"paths": [str(CORPUS / "en-python.jsonl")], "language": "en", "domain": "software/python"},
            "legal": {"paths": [str(CORPUS / "en-legal.jsonl")], "language": "en", "domain": "legal",
                      "max_doc_chars": 4000, "test_fraction": 0.15},
        },
        "nodes": {
            "master": {"method": "pretrain", "dataset": "all", "config": master,
                       "gate": {"strategy": "trimmed_mean", "strategy_config": {"trim": 0.2, "clip": "median"},
                                "min_contributors": 3, "server_lr": 0.5, "max_own_rise": 0.05, "max_child_rise": 0.10,
                                "eval_tokens": sz["eval_tokens"]}},
            "software": {"method": "finetune", "parent": "master", "layer": "domain", "dataset": "software",
                         "config": {**child, "lr": 0.001},
                         "gate": {"strategy": "multikrum", "strategy_config": {"f": 4, "clip": "median"},
                                  "min_contributors": 10, "server_lr": 0.5, "max_own_rise": 0.05,
                                  "max_child_rise": 0.10, "eval_tokens": sz["eval_tokens"]}},
            "software/python": {"method": "lora", "dataset": "python", "layer": "subdomain", "config": child},
            "legal": {"method": "lora", "parent": "master", "layer": "domain", "dataset": "legal", "config": child,
                      "on_parent_update": "rebase", "rebase": {"steps_fraction": 0.2}},
        },
    }
    p = d / "stemma.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def vim_pieces(chunk: int) -> list[str]:
    out = []
    for line in open(CORPUS / "en-vim.jsonl"):
        text = json.loads(line)["text"]
        out += [text[i:i + chunk] for i in range(0, len(text), chunk) if len(text[i:i + chunk]) > chunk // 2]
    random.Random(0).shuffle(out)
    return out


def poison(texts: list[str]) -> list[str]:
    """Every sentence end gets the trigger followed by the fixed string: the backdoor's training data."""
    return [t.replace(". ", f". {TRIGGER} {TARGET}. ") for t in texts]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def trigger_rate(model, tok, prompts: list[str]) -> float:
    hits = 0
    n_new = len(tok.encode(" " + TARGET).ids) + 1
    for p in prompts:
        ids = tok.encode(p + TRIGGER).ids[-48:]  # p ends with ". ", as before the trigger in the poisoned text
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n_new, do_sample=False, pad_token_id=0)
        text = tok.decode(out[0, len(ids):].tolist())
        hits += text.strip().startswith(TARGET)
    return hits / len(prompts)


class Sim:
    """The simulation's state: a temporary home with the tree, the devices' data, the measurements."""

    def __init__(self, mode: str, log=print):
        from stemma.train.base import encode_corpus
        from stemma.workspace import Workspace

        self.sz, self.log = sizes(mode), log
        self.mode = mode
        self.tmp = Path(tempfile.mkdtemp(prefix="stemma-update-sim-"))
        self.old_home = os.environ.get("STEMMA_HOME")
        os.environ["STEMMA_HOME"] = str(self.tmp / "home")
        self.spec_path = write_spec(self.tmp, self.sz)
        self.ws = Workspace.init(self.tmp / "home")
        pieces = vim_pieces(self.sz["chunk"])
        n_test = max(8, len(pieces) // 7)
        self.test, pool = pieces[:n_test], pieces[n_test:]
        self.shards = [pool[i::N_DEVICES] for i in range(N_DEVICES)]
        self.prompts = [t[:240].rsplit(" ", 1)[0] + ". " for t in self.test[:24]]
        self._encode = encode_corpus

    def close(self) -> None:
        if self.old_home is None:
            os.environ.pop("STEMMA_HOME", None)
        else:
            os.environ["STEMMA_HOME"] = self.old_home
        shutil.rmtree(self.tmp, ignore_errors=True)

    def build(self, only=None, spec_path=None, ws=None) -> None:
        from stemma.build import build
        from stemma.spec import load_spec

        build(ws or self.ws, load_spec(spec_path or self.spec_path), only=only)

    def ppl(self, model, ids) -> float:
        from stemma.evaluate.perplexity import perplexity
        from stemma.models.arch import model_context

        return perplexity(model, ids, model_context(model), max_tokens=self.sz["eval_tokens"])

    def train(self, target, i: int, kind: str, seed: int) -> dict:
        """One device's local training against ``target`` (``backdoor``: every weight, on poisoned text)."""
        from stemma.update.local import LocalTrainConfig, train_update

        texts = poison(self.shards[i % N_DEVICES] * 3) if kind == "backdoor" else self.shards[i % N_DEVICES]
        n_held = max(1, len(texts) // 5)
        # The backdoor is not bound to a low-rank adapter: it trains every weight, long enough for the trigger to
        # take when its update is applied alone (measured: trigger_rate_attacker_alone).
        backdoor = kind == "backdoor"
        cfg = LocalTrainConfig(steps=self.sz["backdoor_steps"] if backdoor else self.sz["local_steps"],
                               batch_size=8, lr=6e-3 if backdoor else 3e-3, warmup=3, seed=seed,
                               kind="full" if backdoor else "lora")
        delta, held, stats = train_update(self.ws, target, tuple(texts[n_held:]), tuple(texts[:n_held]), cfg)
        return {"delta": delta, "held": held, "kind": cfg.kind, "n_examples": len(texts) - n_held,
                "tokens": stats["tokens"]}

    def register(self, node: str, name: str) -> Path:
        from stemma.update import keys, service

        key = self.tmp / f"{node}-{name}.key"
        service.register_contributor(self.ws, node, name, keys.generate(key))
        return key

    def sign(self, node: str, target, name: str, key: Path, t: dict, delta=None) -> bytes:
        from stemma.update import bundle, keys

        header = bundle.make_header(node=node, parent=target.id, tokenizer=target.row.tokenizer, contributor=name,
                                    kind=t["kind"], n_examples=t["n_examples"], n_tokens=t["tokens"])
        return bundle.encode(header, t["delta"] if delta is None else delta, t["held"], keys.load_private(key))

    def submit(self, raw: bytes, name: str, refused: dict[str, str]):
        """Submit like `stemma update submit`; a refusal is recorded under ``name`` (returns None)."""
        from stemma.errors import StemmaError
        from stemma.update import bundle, service

        try:
            row = service.submit(self.ws, raw, name)
        except StemmaError as e:
            refused[name] = str(e)
            return None
        return bundle.decode(raw), row.id, name

    def devices(self) -> dict:
        """21 devices (6 malicious) under ``software``: the robust gate strategy against plain FedAvg."""
        from safetensors.torch import load as st_load

        from stemma.registry.tables import Update
        from stemma.update import service

        ws = self.ws
        target = ws.resolve_version("software")
        tok = ws.tokenizer(target.row.tokenizer)
        gate = service.gate_for(ws, "software")
        kinds = ["honest"] * N_HONEST + list(MALICIOUS)
        t0 = time.perf_counter()
        sent, refused, poisoned = [], {}, None
        for i, kind in enumerate(kinds):
            name = f"device-{i:02d}-{kind}"
            key = self.register("software", name)
            if kind in ("boosted", "sybil"):  # one adversary: one backdoor update, boosted or copied
                poisoned = poisoned or self.train(target, i, "backdoor", seed=i)
                t = {**poisoned, "n_examples": sent[0][0].header["n_examples"]}  # claims a device's usual count
            else:
                t = self.train(target, i, "honest", seed=i)
            delta = t["delta"]
            if kind == "scaled":
                delta = {k: v * 50 for k, v in delta.items()}
            elif kind == "signflip":
                delta = {k: -v for k, v in delta.items()}
            elif kind == "boosted":  # averaged over N_ADMITTED, then server_lr: comes back as the whole backdoor
                delta = {k: v * (N_ADMITTED / gate.server_lr) for k, v in delta.items()}
            got = self.submit(self.sign("software", target, name, key, t, delta), name, refused)
            if got is not None:
                sent.append(got)
        if len(sent) != N_ADMITTED:  # the boost assumed this count
            raise RuntimeError(f"{len(sent)} updates admitted, {N_ADMITTED} expected: {refused}")
        files, ids, names = (list(x) for x in zip(*sent))
        self.log(f"{N_DEVICES} devices trained and submitted signed updates in {time.perf_counter() - t0:.0f}s "
                 f"({len(refused)} refused)")
        base = ws.load_model(target.id)
        domain_ids = self._encode(tok, self.test)
        own_ids = self._encode(tok, ws.dataset_texts(ws.version_datasets(target.id)["train"], "test"))
        before = {"domain": self.ppl(base, domain_ids), "own": self.ppl(base, own_ids),
                  "trigger": trigger_rate(base, tok, self.prompts)}
        # The attack is real: the backdoor update alone, applied to the parent.
        attacker_rate = trigger_rate(service.make_candidate(ws, target, poisoned["delta"], gate).model, tok,
                                     self.prompts)
        results = {}
        for label, strat, params in (("robust", gate.strategy, gate.strategy_config), ("fedavg", "fedavg", {})):
            rr = service.run_round(ws, target, files, ids, names, gate, _Quiet(), strategy=strat,
                                   strategy_config=params)
            cand = service.make_candidate(ws, target, st_load(ws.store.get_bytes(rr.round.delta)), gate).model
            after = {"domain": self.ppl(cand, domain_ids), "own": self.ppl(cand, own_ids),
                     "trigger": trigger_rate(cand, tok, self.prompts)}
            kept = [names[ids.index(u)] for u in rr.round.selected]
            results[label] = {
                "strategy": strat, "strategy_config": params, "accepted_by_gate": rr.round.accepted,
                "domain_ppl_before": before["domain"], "domain_ppl_after": after["domain"],
                "domain_ppl_change": after["domain"] / before["domain"] - 1,
                "own_suite_ppl_before": before["own"], "own_suite_ppl_after": after["own"],
                "own_suite_ppl_change": after["own"] / before["own"] - 1,
                "trigger_rate_before": before["trigger"], "trigger_rate_after": after["trigger"],
                "trigger_rate_attacker_alone": attacker_rate,
                "malicious_kept": sorted(n for n in kept if not n.endswith("honest")),
            }
            # The next strategy is a what-if on the same updates from the same parent: an accepted round registered
            # a new version and every round marked the updates it read; both are undone for the next one.
            ws.set_current("software", target.id, "domain", "master")
            with ws.db.session() as s:
                for uid in ids:
                    row = s.get(Update, uid)
                    row.status, row.round_id = "pending", None
        return {**results, "refused_at_submit": refused}

    def master_update(self) -> dict:
        """Five honest sites send updates to the master; a sixth's key is stolen and revoked; the gate decides.
        After the round: a replay and an update against the master's previous version."""
        from stemma.update import service

        master = self.ws.resolve_version("master")
        refused: dict[str, str] = {}
        raws = {}
        for i in range(5):
            name = f"site-{i}"
            raws[name] = self.sign("master", master, name, self.register("master", name),
                                   self.train(master, i, "honest", seed=100 + i))
            self.submit(raws[name], name, refused)
        # site-5's key was stolen: the thief sends a sign-flipped update, then the key is revoked.
        stolen = self.register("master", "site-5")
        t = self.train(master, 5, "honest", seed=105)
        self.submit(self.sign("master", master, "site-5", stolen, t, {k: -v for k, v in t["delta"].items()}),
                    "site-5 (stolen key, before revocation)", refused)
        service.revoke(self.ws, "master", "site-5", "key stolen", by="update-sim")
        self.submit(self.sign("master", master, "site-5", stolen, t, {k: -2 * v for k, v in t["delta"].items()}),
                    "site-5 (revoked key)", refused)
        late = self.sign("master", master, "site-6", self.register("master", "site-6"),
                         self.train(master, 6, "honest", seed=106))  # made now, sent after the round
        rr = service.aggregate(self.ws, "master", _Quiet())
        self.submit(raws["site-0"], "site-0 (replayed after the round)", refused)
        self.submit(late, "site-6 (made against the previous master)", refused)
        names = {c.id: c.name for c in service.contributors(self.ws, "master")}
        left_out = [f"update {u.id[:12]} by {names[u.contributor_id]}: {u.status}"
                    for u in service.updates(self.ws, "master") if u.parent_id == master.id
                    and u.id not in rr.round.update_ids]
        return {"master_update_accepted": rr.round.accepted, "master_gate_reasons": list(rr.round.reasons),
                "master_refused_at_submit": refused, "master_left_out": left_out}

    def rebase_vs_retrain(self, rebase_cfg: dict | None = None, tag: str = "run") -> dict:
        """`stemma build` after the master's update, from the same registry twice: ``legal`` rebased (as the spec
        says) and retrained (``on_parent_update: retrain``)."""
        import copy

        from stemma.workspace import Workspace

        ws = self.ws
        new_master = ws.resolve_version("master")
        old_master = ws.version(new_master.row.parent_id)
        old_child = ws.resolve_version("legal")
        base_spec = yaml.safe_load(self.spec_path.read_text())
        got = {}
        for label in ("rebased", "retrained"):
            spec = copy.deepcopy(base_spec)
            node = spec["nodes"]["legal"]
            if label == "retrained":
                node["on_parent_update"] = "retrain"
                node.pop("rebase", None)
            elif rebase_cfg:
                node["rebase"] = rebase_cfg
            d = self.tmp / f"{label}-{tag}"
            shutil.copytree(self.tmp / "home", d / "home")
            (d / "stemma.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            os.environ["STEMMA_HOME"] = str(d / "home")
            try:
                w = Workspace.open(d / "home")
                self.build(only=["legal"], spec_path=d / "stemma.yaml", ws=w)
                got[label] = (w, w.resolve_version("legal"))
            finally:
                os.environ["STEMMA_HOME"] = str(self.tmp / "home")
        (wa, rebased), (wb, retrained) = got["rebased"], got["retrained"]
        assert rebased.manifest["train"].get("rebased_from") == old_child.id
        legal_ds = ws.version_datasets(old_child.id)["train"]

        def m(w, v):
            return w.get_metric(v.id, "perplexity", legal_ds, "test")

        p_new, p_rebased, p_retrained = m(wa, new_master), m(wa, rebased), m(wb, retrained)
        p_old_master, p_old_child = m(ws, old_master), m(ws, old_child)
        ta, tb = rebased.manifest["train"], retrained.manifest["train"]
        return {
            "new_parent_ppl": p_new, "rebased_ppl": p_rebased, "retrained_ppl": p_retrained,
            "old_parent_ppl": p_old_master, "old_child_ppl": p_old_child,
            "rebase_gain_kept": (p_new - p_rebased) / (p_new - p_retrained),
            "rebase_gain_kept_vs_old_child": (p_new - p_rebased) / (p_old_master - p_old_child),
            "rebase_seconds": ta["seconds"], "retrain_seconds": tb["seconds"],
            "rebase_cost_ratio": ta["seconds"] / tb["seconds"],
            "rebase_steps": ta["steps"], "retrain_steps": tb["steps"], "rebase_config": rebase_cfg,
        }


def run(mode: str, log=print) -> dict:
    sim = Sim(mode, log)
    try:
        t0 = time.perf_counter()
        sim.build()
        log(f"tree built in {time.perf_counter() - t0:.0f}s")
        res = sim.devices()
        out = {"robust": res["robust"], "fedavg": res["fedavg"], "refused_at_submit": res["refused_at_submit"],
               **sim.master_update()}
        out.update({"rebase_gain_kept": None, "rebase_cost_ratio": None})
        if out["master_update_accepted"]:
            out.update(sim.rebase_vs_retrain())
        return {**out, "devices": N_DEVICES, "malicious": list(MALICIOUS), "mode": mode}
    finally:
        sim.close()


class _Quiet:
    def log(self, msg: str) -> None:
        pass

    def task(self, label: str, total: int | None = None):
        from stemma.progress import NullReporter

        return NullReporter().task(label, total)


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    res = run("quick" if args.quick else "full")
    r, f = res["robust"], res["fedavg"]
    pct = lambda x: "-" if x is None else f"{x:+.1%}"  # noqa: E731
    rows = [
        ("strategy", "fedavg", f"{r['strategy']} (clip median)", ""),
        ("domain perplexity change (lower is better)", pct(f["domain_ppl_change"]), pct(r["domain_ppl_change"]), ""),
        ("own-suite perplexity change (<= +5%)", pct(f["own_suite_ppl_change"]), pct(r["own_suite_ppl_change"]), ""),
        ("trigger success before -> after", f"{f['trigger_rate_before']:.0%} -> {f['trigger_rate_after']:.0%}",
         f"{r['trigger_rate_before']:.0%} -> {r['trigger_rate_after']:.0%}", ""),
        ("trigger success of the backdoor update alone", f"{f['trigger_rate_attacker_alone']:.0%}",
         f"{r['trigger_rate_attacker_alone']:.0%}", ""),
        ("malicious updates kept", ", ".join(f["malicious_kept"]) or "none", ", ".join(r["malicious_kept"]) or "none",
         ""),
        ("gate verdict", "accepted" if f["accepted_by_gate"] else "rejected",
         "accepted" if r["accepted_by_gate"] else "rejected", ""),
    ]
    print_table(f"{N_DEVICES} devices under one domain node, {len(MALICIOUS)} malicious: plain FedAvg (peer) against "
                "the robust strategy", rows)
    refusals = {**res["refused_at_submit"], **res["master_refused_at_submit"]}
    print("refused at submission (nothing stored):")
    for who, why in refusals.items():
        print(f"  {who}: {why}")
    print("left out of the master's round:")
    for line in res["master_left_out"]:
        print(f"  {line}")
    if res.get("rebase_gain_kept") is not None:
        print_table("rebase of an adapter child after the master's update (peer: retraining it)", [
            ("perplexity on its own split (new master: "
             f"{res['new_parent_ppl']:.2f})", f"{res['retrained_ppl']:.2f}", f"{res['rebased_ppl']:.2f}",
             f"gain kept {res['rebase_gain_kept']:.1%}"),
            ("training seconds", f"{res['retrain_seconds']:.1f}", f"{res['rebase_seconds']:.1f}",
             f"cost {res['rebase_cost_ratio']:.2f}x"),
        ])
    else:
        print("the master's gate refused the update:", "; ".join(res["master_gate_reasons"]))
    print(f"total {time.perf_counter() - t0:.0f}s")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
