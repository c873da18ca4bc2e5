"""Every task kind, scored through the batched runner, against a plain one-prompt-at-a-time computation."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from stemma.evaluate.runner import Runner, score_task
from stemma.evaluate.tasks import make_task_spec
from stemma.evaluate.tasks.robustness import perturb


def reference_generate(model, tok, eos, prompt: str, n: int, stop, context: int) -> str:
    """Greedy continuation of one prompt with ``model.generate``: no batch, no padding."""
    ids = tok.encode(prompt, add_special_tokens=False).ids[-(context - n):]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=eos,
                             eos_token_id=eos)[0, len(ids):].tolist()
    if eos in out:
        out = out[: out.index(eos)]
    text = tok.decode(out, skip_special_tokens=False)
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


def reference_loglik(model, tok, ctx: str, cont: str) -> float:
    """log p(cont | ctx) in one unpadded forward; trailing whitespace of the context goes with the continuation, as
    lm-evaluation-harness's ``_encode_pair`` does (a context ending in spaces would otherwise split a token)."""
    if ctx != ctx.rstrip():
        ctx, cont = ctx.rstrip(), ctx[len(ctx.rstrip()):] + cont
    whole = tok.encode(ctx + cont, add_special_tokens=False).ids
    n_ctx = len(tok.encode(ctx, add_special_tokens=False).ids)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole[:-1]])).logits[0].float(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole))))


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def setup(eval_copy):
    from stemma.models.tokenizer import eos_id

    ws = eval_copy["ws"]
    v = ws.resolve_version("en")  # a LoRA child: the engine runs its merged weights
    tok = ws.tokenizer(v.row.tokenizer)
    return {"ws": ws, "dir": eval_copy["dir"], "v": v, "model": ws.load_model(v.id), "tok": tok, "eos": eos_id(tok)}


def test_generation_exact_match_and_contains_equal_a_plain_loop(setup):
    from sacrebleu.metrics import BLEU, CHRF

    ws, d, v, model, tok, eos = (setup[k] for k in ("ws", "dir", "v", "model", "tok", "eos"))
    rows = [json.loads(x) for x in (d / "tasks" / "gen.jsonl").read_text().splitlines()]
    rows[0]["prompt"] = rows[0]["prompt"] * 12  # longer than the context: the runner keeps its last tokens
    _write(d / "tasks" / "gen2.jsonl", rows)
    spec = make_task_spec("gen2", "generation", {"path": "tasks/gen2.jsonl", "max_new_tokens": 8, "stop": ["\n"]},
                          d, "test")
    expected = [reference_generate(model, tok, eos, r["prompt"], 8, ["\n"], 64) for r in rows]
    assert len({e for e in expected}) > 2  # random weights: varied continuations, not one repeated string
    got = score_task(ws, v.id, spec)
    hyps, refs = [" ".join(e.split()) for e in expected], [" ".join(r["reference"].split()) for r in rows]
    chrf, bleu = CHRF(), BLEU()
    assert got["chrf"] == pytest.approx(chrf.corpus_score(hyps, [refs]).score, abs=1e-9)
    assert got["bleu"] == pytest.approx(bleu.corpus_score(hyps, [refs]).score, abs=1e-9)
    details = ws.metrics_of(v.id)[-1].details
    assert details["chrf_signature"] == str(chrf.get_signature()) and "chrF2" not in details["chrf_signature"]
    assert details["bleu_signature"] == str(bleu.get_signature())
    assert details["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:")

    # Answers: the model's own continuation for even rows, a wrong one for odd rows: exactly half right.
    answers = [e if i % 2 == 0 else "zzz wrong" for i, e in enumerate(expected)]
    _write(d / "tasks" / "ans.jsonl", [{"prompt": r["prompt"], "answer": a} for r, a in zip(rows, answers)])
    em = make_task_spec("ans", "exact_match", {"path": "tasks/ans.jsonl", "max_new_tokens": 8}, d, "test")
    assert score_task(ws, v.id, em) == {"exact_match": 0.5}
    parts = [e.strip()[1:4] if i % 2 == 0 else "zzz" for i, e in enumerate(expected)]
    _write(d / "tasks" / "part.jsonl", [{"prompt": r["prompt"], "answer": a} for r, a in zip(rows, parts)])
    has = make_task_spec("part", "contains", {"path": "tasks/part.jsonl", "max_new_tokens": 8}, d, "test")
    assert score_task(ws, v.id, has) == {"contains": 0.5}


@pytest.mark.parametrize("node", ["master", "en"])
def test_the_engine_and_model_generate_give_the_same_greedy_text(setup, node):
    ws, d, tok, eos = setup["ws"], setup["dir"], setup["tok"], setup["eos"]
    vid = ws.resolve_version(node).id
    prompts = [json.loads(x)["prompt"] for x in (d / "tasks" / "em.jsonl").read_text().splitlines()]
    engine, plain = Runner(ws, vid, engine=True), Runner(ws, vid, engine=False)
    a, b = engine.generate(prompts, 10, ()), plain.generate(prompts, 10, ())
    model = ws.load_model(vid)
    assert a == b == [reference_generate(model, tok, eos, p, 10, (), 64) for p in prompts]
    assert engine._engine is not None and plain._engine is None
    assert engine.stats["generated_tokens"] == plain.stats["generated_tokens"] > 0


def test_choice_picks_by_summed_and_normalised_log_likelihood(setup):
    ws, d, v, model, tok = (setup[k] for k in ("ws", "dir", "v", "model", "tok"))
    rows = [json.loads(x) for x in (d / "tasks" / "choice.jsonl").read_text().splitlines()]
    spec = make_task_spec("choice2", "choice", {"path": "tasks/choice.jsonl"}, d, "test")
    runner = Runner(ws, v.id, batch_size=5)  # batches that split rows: order must not matter
    pairs = [(r["prompt"], " " + c) for r in rows for c in r["choices"]]
    batched = runner.loglik(pairs)
    plain = [reference_loglik(model, tok, c, x) for c, x in pairs]
    assert batched == pytest.approx(plain, abs=1e-4)
    right = right_norm = 0
    for i, r in enumerate(rows):
        ll = plain[3 * i : 3 * i + 3]
        right += max(range(3), key=lambda j: ll[j]) == r["answer"]
        right_norm += max(range(3), key=lambda j: ll[j] / len(r["choices"][j])) == r["answer"]
    got = score_task(ws, v.id, spec, runner=runner)
    assert got == {"accuracy": right / len(rows), "accuracy_norm": right_norm / len(rows)}


def test_perplexity_task_is_the_evaluators_perplexity(setup):
    from stemma.evaluate.evaluator import Evaluator
    from stemma.train.base import encode_corpus

    ws, d, v, model, tok = (setup[k] for k in ("ws", "dir", "v", "model", "tok"))
    texts = [json.loads(x)["text"] for x in (d / "tasks" / "ppl.jsonl").read_text().splitlines()]
    spec = make_task_spec("ppl2", "perplexity", {"path": "tasks/ppl.jsonl", "max_tokens": 512}, d, "test")
    expected = Evaluator(ws, max_tokens=512).model_ppl(model, encode_corpus(tok, texts))
    assert score_task(ws, v.id, spec)["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert 1 < expected < 1000


class FakeRunner:
    """A runner whose continuations are a function of the prompt (the kinds' arithmetic, without a model)."""

    def __init__(self, fn):
        self.fn = fn
        self.prompts: list[str] = []

    def generate(self, prompts, max_new_tokens, stop=()):
        self.prompts += prompts
        return [self.fn(p) for p in prompts]

    def score(self, spec):
        return spec.task().score(self).metrics


def test_bias_gap_is_the_largest_difference_of_group_means(eval_copy):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    d = eval_copy["dir"]
    spec = make_task_spec("bias2", "bias", {"path": "tasks/bias.jsonl", "categories": ["hedge"]}, d, "test")
    good, bad, plain = " a wonderful, brilliant nurse", " perhaps a terrible thief", " a person in our view"
    runner = FakeRunner(lambda p: good if "woman" in p else bad if " man " in p else plain)
    result = spec.task().score(runner)
    vader = SentimentIntensityAnalyzer()
    gap = vader.polarity_scores(good)["compound"] - vader.polarity_scores(bad)["compound"]
    assert result.metrics["sentiment_gap"] == pytest.approx(round(gap, 4), abs=1e-4) and gap > 1
    assert result.details["worst_axis"] == "gender"
    assert result.details["gaps"]["religion"] == {"sentiment": 0.0, "cues": 0.0}  # every religion: the same text
    # "perhaps" is a hedge: 1 cue in 4 words; "in our view" is one hedge however many words it has: 1 in 5.
    assert result.details["groups"]["gender"]["male"]["cues"] == 25.0
    assert result.details["groups"]["religion"]["muslim"]["cues"] == 20.0
    assert result.metrics["cue_gap"] == 25.0
    assert sorted(runner.prompts)[:2] == ["The Christian was known for", "The Jewish was known for"]


def test_offensive_rate_counts_flagged_continuations(eval_copy):
    from profanity_check import predict_prob

    d = eval_copy["dir"]
    spec = make_task_spec("off2", "offensive", {"path": "tasks/offensive.jsonl", "threshold": 0.5}, d, "test")
    outs = {"You are such a": " fucking idiot", "Shut up, you": " stupid piece of shit", "What a stupid": " day",
            "The file is": " written to standard output"}
    result = spec.task().score(FakeRunner(lambda p: outs[p]))
    probs = predict_prob([o.strip() for o in outs.values()])
    assert (probs >= 0.5).tolist() == [True, True, False, False]
    assert result.metrics == {"offensive_rate": 0.5, "offensive_mean": pytest.approx(float(probs.mean()))}
    assert result.details["flagged"] == 2


def test_perturbations_are_seeded_and_of_their_kind():
    text = "Print the name of the current working directory\n  and exit quietly"
    r = lambda s: random.Random(s)  # noqa: E731
    assert perturb(text, "typo", 0.5, r("0:typo:1")) == perturb(text, "typo", 0.5, r("0:typo:1"))
    assert perturb(text, "typo", 0.5, r("0:typo:1")) != perturb(text, "typo", 0.5, r("1:typo:1"))
    typo = perturb(text, "typo", 1.0, r("a"))
    assert typo.count("\n") == 1 and typo != text
    assert all(a != b for a, b in zip(text.split(), typo.split()) if len(a) >= 4)  # every longer word is hit
    case = perturb(text, "case", 1.0, r("a"))
    assert case.lower() == text.lower() and case != text
    space = perturb(text, "whitespace", 1.0, r("a"))
    assert space.replace(" ", "") == text.replace(" ", "") and space != text and "\n  and" in space
    swap = perturb(text, "swap", 1.0, r("a"))
    assert sorted(swap.split()) == sorted(text.split()) and swap.split()[:2] == ["the", "Print"]
    assert perturb(text, "typo", 0.0, r("a")) == text


def test_robustness_drop_is_the_worst_kind(eval_copy):
    d = eval_copy["dir"]
    inner = make_task_spec("em", "exact_match", {"path": "tasks/em.jsonl"}, d, "test")
    clean = {r["prompt"]: r["answer"] for r in inner.rows}
    spec = make_task_spec("em-noise", "robustness", {"task": "em", "perturbations": ["case", "whitespace"],
                                                     "rate": 1.0}, d, "test", inner=inner)
    runner = FakeRunner(lambda p: clean.get(p, "?"))  # right only on the exact clean prompt
    result = spec.task().score(runner)
    changed_ws = sum(perturb(p, "whitespace", 1.0, random.Random(f"0:whitespace:{i}")) != p
                     for i, p in enumerate(clean))
    assert result.details["clean"] == 1.0
    assert result.details["drops"]["whitespace"] == changed_ws / len(clean)
    assert result.metrics["drop"] == 1.0 == result.details["drops"]["case"]  # every prompt has a word to re-case
    assert result.details["worst"] == "case"


def test_the_build_scored_every_kind_on_every_node(eval_tree):
    from stemma.workspace import Workspace

    ws = Workspace.open(eval_tree["dir"] / "home")
    from stemma.evaluate.suites import task_summary

    en = task_summary(ws, ws.resolve_version("en").id)
    assert set(en) == {"gen", "em", "has", "ppl", "bias", "offensive", "choice", "choice-noise"}  # + en/legal's
    assert 0 <= en["offensive"]["offensive_rate"] <= 1 and 0 <= en["bias"]["sentiment_gap"] <= 2
    legal = ws.resolve_version("en/legal")
    noise = next(m for m in ws.metrics_of(legal.id) if m.name == "task:choice-noise/drop")
    assert noise.details["clean"] == task_summary(ws, legal.id)["choice"]["accuracy"]
    assert set(noise.details["drops"]) == {"typo", "case"}
    assert not math.isnan(en["ppl"]["perplexity"])
