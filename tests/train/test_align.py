"""`sft` and `dpo`: response-only labels, pairs files checked before training, builds as adapter or full weights,
the pairs file in the recipe, and the DPO loss equal to TRL's on the same batch."""

import json
import shutil

import pytest
import torch
import yaml

from stemma.build import build
from stemma.errors import DataError, SpecError
from stemma.spec import load_spec
from stemma.train import align
from stemma.train.dpo import dpo_loss, encode_pair, sequence_logps
from tests.conftest import CORPUS

DEMO = CORPUS.parent
SFT_PAIRS = DEMO / "align" / "sft.jsonl"
DPO_PAIRS = DEMO / "align" / "dpo.jsonl"


@pytest.fixture(scope="module")
def tok():
    from stemma.models.tokenizer import TokenizerConfig, train_tokenizer

    texts = [json.loads(line)["text"][:2000] for line in (CORPUS / "en-manpages.jsonl").open()][:30]
    return train_tokenizer(texts, TokenizerConfig(384, 2))


def _ids(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------- labels
def test_labels_are_the_response_tokens_and_nothing_else(tok):
    rec = {"prompt": "What does the ls command do?", "response": "ls - list directory contents"}
    ids, labels, cut = align.encode(tok, align.render_sft(rec, "chat"), eos=0, max_len=1000)
    prompt = _ids(tok, "User: What does the ls command do?\nAssistant:")
    response = _ids(tok, " ls - list directory contents")
    assert not cut
    assert ids == prompt + response + [0]
    assert labels == [-100] * len(prompt) + response + [0]
    assert tok.decode([t for t in labels if t != -100]) == " ls - list directory contents"
    # The transcript is the one `stemma serve` gives a chat request, so the node answers as it was trained.
    from stemma.serve.api import ChatMessage, chat_prompt

    assert tok.decode(prompt) == chat_prompt([ChatMessage(role="user", content=rec["prompt"])])
    # plain: the prompt text, then the response text, as written.
    ids, labels, _ = align.encode(tok, align.render_sft({"prompt": "Q: ls?\nA:", "response": " lists"}, "plain"), 0,
                                  1000)
    assert labels == [-100] * len(_ids(tok, "Q: ls?\nA:")) + _ids(tok, " lists") + [0]


def test_chat_messages_train_every_assistant_turn_only(tok):
    msgs = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "ls?"},
            {"role": "assistant", "content": "Lists files."}, {"role": "user", "content": "cp?"},
            {"role": "assistant", "content": "Copies files."}]
    ids, labels, _ = align.encode(tok, align.render_messages(msgs), eos=0, max_len=1000)
    segments = [("Answer briefly.\n\n", False), ("User: ls?\n", False), ("Assistant:", False),
                (" Lists files.\n", True), ("User: cp?\n", False), ("Assistant:", False), (" Copies files.", True)]
    want = []
    for text, trained in segments:
        want += _ids(tok, text) if trained else [-100] * len(_ids(tok, text))
    assert labels == want + [0]
    assert tok.decode(ids[:-1]) == "".join(t for t, _ in segments)


def test_truncation_drops_the_prompt_start_first_then_the_response_end(tok):
    segs = [("User: " + "word " * 50 + "\nAssistant:", False), (" short answer", True)]
    ids, labels, cut = align.encode(tok, segs, eos=0, max_len=20)
    response = _ids(tok, " short answer") + [0]
    assert cut and len(ids) == 20 and labels[-len(response):] == response
    assert labels[: 20 - len(response)] == [-100] * (20 - len(response))
    long = [("User: hi\nAssistant:", False), (" " + "word " * 50, True)]
    ids, labels, cut = align.encode(tok, long, eos=0, max_len=12)
    assert cut and len(ids) == 12 and labels[0] == -100 and labels[1] != -100  # one prompt token predicts the first
    batch_ids, batch_labels = align.collate([([5, 6, 7], [-100, 6, 7]), ([5, 8], [-100, 8])], pad=0)
    assert batch_ids.tolist() == [[5, 6, 7], [5, 8, 0]]
    assert batch_labels.tolist() == [[-100, 6, 7], [-100, 8, -100]]


def test_heldout_split_is_by_prompt_hash_and_shared_by_both_files():
    sft = align.read_pairs(SFT_PAIRS, "sft")
    dpo = align.read_pairs(DPO_PAIRS, "dpo")
    held_sft = {r["prompt"] for r in align.split_pairs(sft, 0.1, "chat")[1]}
    held_dpo = {r["prompt"] for r in align.split_pairs(dpo, 0.1, "chat")[1]}
    assert 0.05 < len(held_dpo) / len(dpo) < 0.15
    assert held_dpo <= held_sft  # a DPO child's held-out questions were held out of its SFT parent too
    trained_sft = {r["prompt"] for r in align.split_pairs(sft, 0.1, "chat")[0]}
    assert not held_dpo & trained_sft


# ---------------------------------------------------------------------------------------------- bad input
def _with_nodes(tree, nodes: dict) -> None:
    spec = yaml.safe_load(tree["spec"].read_text())
    spec["nodes"].update(nodes)
    tree["spec"].write_text(yaml.safe_dump(spec, sort_keys=False))


BAD = [
    ("sft", '{"prompt": "What does ls do?"}\n', r"bad\.jsonl:1: missing field 'response' \(a sft pair needs prompt, "
                                               r"response \(or messages\)\)"),
    ("sft", "", r"bad\.jsonl: no pairs \(the file is empty\)"),
    ("sft", '{"prompt": "a", "response": "b"}\n{"prompt": "a", "resp\n', r"bad\.jsonl:2: not a JSON line"),
    ("sft", '{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad\.jsonl:1: messages must end with an assist"),
    ("dpo", '{"prompt": "a", "chosen": "b"}\n', r"bad\.jsonl:1: missing field 'rejected'"),
    ("dpo", '{"prompt": "a", "chosen": "b", "rejected": " b "}\n', r"bad\.jsonl:1: chosen and rejected are the same"),
    ("dpo", '{"prompt": "a", "chosen": 3, "rejected": "c"}\n', r"bad\.jsonl:1: field 'chosen' must be a non-empty"),
]


def test_bad_pairs_are_refused_in_one_line_before_anything_trains(tree_copy, tmp_path, monkeypatch):
    from stemma.methods import get
    from stemma.train.dpo import Dpo
    from stemma.train.sft import Sft

    # Each problem is found by the method's pre-flight check, which reads the whole file.
    for kind, text, message in BAD:
        (tmp_path / "bad.jsonl").write_text(text)
        method = get(kind)
        with pytest.raises(DataError, match=message) as e:
            method.recipe_inputs(method.make_config({"pairs": "bad.jsonl"}, "t"), tmp_path)
        assert "\n" not in str(e.value)
    # Through `stemma build`: refused before any registry write or checkpoint, the method never started.
    ws = tree_copy["ws"]
    before = {n.path: n.current_version for n in ws.nodes()}
    ran = []
    monkeypatch.setattr(Sft, "run", lambda *a: ran.append(a))
    monkeypatch.setattr(Dpo, "run", lambda *a: ran.append(a))
    _with_nodes(tree_copy, {"en/software/bad": {"method": "dpo", "config": {"pairs": "bad.jsonl", "steps": 2}},
                            "en/software/empty": {"method": "sft", "config": {"pairs": "empty.jsonl", "steps": 2}}})
    (tree_copy["dir"] / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b"}\n')
    (tree_copy["dir"] / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field 'rejected'"):
        build(ws, load_spec(tree_copy["spec"]))
    (tree_copy["dir"] / "bad.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(DataError, match=r"empty\.jsonl: no pairs \(the file is empty\)"):
        build(ws, load_spec(tree_copy["spec"]))
    assert not ran
    assert {n.path: n.current_version for n in ws.nodes()} == before
    work = ws.settings.work_dir
    assert not [d for d in (work.iterdir() if work.exists() else ()) if d.name != "curate"]  # no checkpoint
    # What can be checked without files fails at spec time.
    for node, message in [({"method": "sft", "config": {"steps": 2}}, "config field pairs is required"),
                          ({"method": "dpo", "config": {"pairs": "x", "beta": 0}}, "beta must be > 0"),
                          ({"method": "sft", "config": {"pairs": "x", "mode": "half"}}, "mode"),
                          ({"method": "sft", "config": {"pairs": "x"}, "on_parent_update": "rebase"},
                           "only adapter children can rebase \\(method sft retrains\\)")]:
        _with_nodes(tree_copy, {"en/software/bad": node})
        with pytest.raises(SpecError, match=message):
            load_spec(tree_copy["spec"])


# ---------------------------------------------------------------------------------------------- builds
def test_sft_lora_sft_full_and_dpo_build_and_the_pairs_file_is_in_the_recipe(tree_copy):
    ws = tree_copy["ws"]
    d = tree_copy["dir"]
    shutil.copy(SFT_PAIRS, d / "sft.jsonl")
    shutil.copy(DPO_PAIRS, d / "dpo.jsonl")
    small = {"steps": 12, "batch_size": 8, "lr": 0.003, "warmup": 2}
    _with_nodes(tree_copy, {
        "en/software/qa": {"method": "sft", "dataset": "en-software", "config": {"pairs": "sft.jsonl", **small}},
        "en/legal/qa": {"method": "sft", "config": {"pairs": "sft.jsonl", "mode": "full", **small, "lr": 0.001,
                                                    "l2sp": 0.01}},
        "en/software/qa/pref": {"method": "dpo", "layer": "subdomain",
                                "config": {"pairs": "dpo.jsonl", **small, "batch_size": 4}},
    })
    events = {e.node: e.action for e in build(ws, load_spec(tree_copy["spec"]))}
    assert events["en/software/qa"] == events["en/legal/qa"] == events["en/software/qa/pref"] == "built"
    assert events["en/software"] == "reused"

    qa, full, pref = (ws.resolve_version(n) for n in ("en/software/qa", "en/legal/qa", "en/software/qa/pref"))
    parent = ws.resolve_version("en/software")
    assert (qa.row.relation, full.row.relation, pref.row.relation) == ("adapter", "finetune", "adapter")
    assert set(qa.manifest["files"]) == set(pref.manifest["files"]) == {"adapter_config.json",
                                                                        "adapter_model.safetensors"}
    assert qa.manifest["base"] == parent.id and full.manifest["base"] is None
    assert "model.safetensors" in full.manifest["files"] and full.row.own_params == full.row.params
    # The pairs file enters the recipe by content, not by path.
    digest = qa.manifest["train"]["pairs"]
    assert qa.manifest["recipe"]["inputs"]["pairs"]["sha256"] == digest
    assert "pairs" not in qa.manifest["recipe"]["config"]
    for v in (qa, full):
        t = v.manifest["train"]
        assert t["train_pairs"] + t["heldout_pairs"] == 261 and t["steps"] == 12
        assert t["heldout_loss"] < t["parent_heldout_loss"]  # the answers held out got likelier
    # dpo: held-out preference numbers in the manifest and as metrics.
    t = pref.manifest["train"]
    assert t["heldout_pairs"] > 0 and set(t) >= {"pref_accuracy", "parent_pref_accuracy", "reward_margin"}
    metrics = {m.name: m for m in ws.metrics_of(pref.id)}
    assert metrics["pref/accuracy"].value == t["pref_accuracy"] and metrics["pref/accuracy"].split == "heldout"
    assert metrics["pref/accuracy"].details["parent"] == t["parent_pref_accuracy"]
    assert metrics["pref/margin"].value == t["reward_margin"]
    # The chain loads (sft adapter on the domain adapter, dpo adapter on that) and the node's dataset is recorded.
    assert [c.row.node_path for c in ws.chain(pref.id)][-3:] == ["en/software", "en/software/qa", "en/software/qa/pref"]
    assert ws.version_datasets(qa.id) == {"train": ws.version_datasets(parent.id)["train"],
                                          "replay": ws.version_datasets(parent.id)["train"]}
    ws.load_model(pref.id)

    # Moving the file changes nothing; editing one pair rebuilds that node and its descendants only.
    (d / "sft.jsonl").rename(d / "moved.jsonl")
    spec = yaml.safe_load(tree_copy["spec"].read_text())
    for n in ("en/software/qa", "en/legal/qa"):
        spec["nodes"][n]["config"]["pairs"] = "moved.jsonl"
    tree_copy["spec"].write_text(yaml.safe_dump(spec, sort_keys=False))
    assert {e.action for e in build(ws, load_spec(tree_copy["spec"]), evaluate=False)} == {"reused"}
    lines = (d / "dpo.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"chosen": "', '"chosen": "the ', 1)
    (d / "dpo.jsonl").write_text("\n".join(lines) + "\n")
    events = {e.node: e.action for e in build(ws, load_spec(tree_copy["spec"]), evaluate=False)}
    assert [n for n, a in events.items() if a == "built"] == ["en/software/qa/pref"]


# ---------------------------------------------------------------------------------------------- TRL parity
def test_dpo_loss_equals_trl_dpo_trainer_on_the_same_batch(tree_copy, tmp_path, monkeypatch):
    """TRL's DPOTrainer computes its sigmoid loss on a batch it tokenized and collated itself; the same batch
    through stemma's log-probabilities and loss gives the same number (policy: en/software, reference: en)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from stemma.models.tokenizer import eos_id, hf_tokenizer

    ws = tree_copy["ws"]
    policy_v, ref_v = ws.resolve_version("en/software"), ws.resolve_version("en")
    policy, ref = ws.load_model(policy_v.id).eval(), ws.load_model(ref_v.id).eval()
    tok = ws.tokenizer(policy_v.row.tokenizer)
    eos = eos_id(tok)
    fits = [r for r in align.read_pairs(DPO_PAIRS, "dpo")  # within the tiny models' 64 positions
            if max(len(ids) for ids, _ in encode_pair(tok, r, "chat", eos, 10_000)) <= 64]
    recs = fits[:6]
    rows = [{"prompt": align.prompt_text(r["prompt"], "chat"), "chosen": align.response_text(r["chosen"], "chat"),
             "rejected": align.response_text(r["rejected"], "chat")} for r in recs]
    beta = 0.1
    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=["sigmoid"], report_to=[], use_cpu=True,
                     per_device_train_batch_size=len(rows), max_length=None, dataset_num_proc=None)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=hf_tokenizer(tok))
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    # TRL tokenized the same ids as stemma (prompt, then the response with its end-of-text token).
    for ex, r in zip(examples, recs):
        (c_ids, c_lab), (r_ids, r_lab) = encode_pair(tok, r, "chat", eos, 10_000)
        assert ex["prompt_ids"] + ex["chosen_ids"] == c_ids and ex["prompt_ids"] + ex["rejected_ids"] == r_ids
        assert [t for t in c_lab if t != -100] == ex["chosen_ids"]
    batch = trainer.data_collator(examples)
    trainer.model.eval()
    with torch.no_grad():
        trl_loss = float(trainer._compute_loss(trainer.model, batch, False))
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        lp = sequence_logps(policy, batch["input_ids"], labels)
        ref_lp = sequence_logps(ref, batch["input_ids"], labels)
    n = len(rows)
    ours, margin = dpo_loss(lp[:n], lp[n:], ref_lp[:n], ref_lp[n:], beta)
    assert abs(trl_loss - 0.6931) > 1e-3  # policy and reference differ: not the trivial log 2
    assert abs(float(ours.mean()) - trl_loss) < 1e-5
    assert float(margin.mean()) == pytest.approx(trainer._metrics["eval"]["rewards/margins"][-1], abs=1e-5)
