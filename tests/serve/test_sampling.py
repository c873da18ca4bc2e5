"""Sampling parameters as vLLM's OpenAI server has them: penalties, top-k, min-p, logit bias, logprobs.

`sample` on made-up logits (each parameter's semantics, per row of one batch), then the official `openai` client
against a real server."""

from __future__ import annotations

import math

import pytest
import torch

from stemma.serve.api import create_app
from stemma.serve.config import ServeConfig
from stemma.serve.engine import SamplingParams, Sequence, sample
from stemma.serve.server import ServerThread

V = 8


def _seq(prompt=(0,), generated=(), seed=None, **params) -> Sequence:
    s = Sequence(prompt=list(prompt), params=SamplingParams(max_tokens=4, **params), adapter=(), sink=lambda e: None)
    s.generated = list(generated)
    if s.params.temperature > 0:
        s.generator = torch.Generator().manual_seed(0 if seed is None else seed)
    return s


def _logits(*rows) -> torch.Tensor:
    out = torch.full((len(rows), V), -5.0)
    for i, row in enumerate(rows):
        for t, v in row.items():
            out[i, t] = v
    return out


def test_penalties_and_bias_per_row_of_one_batch():
    row = {5: 2.0, 6: 1.9, 7: -1.0}
    seqs = [
        _seq(temperature=0),                                                  # plain greedy
        _seq(generated=[5], temperature=0, repetition_penalty=1.5),          # 2.0 / 1.5 < 1.9
        _seq(prompt=[5], temperature=0, repetition_penalty=1.5),             # the prompt counts too
        _seq(generated=[5], temperature=0, presence_penalty=0.5),            # 2.0 - 0.5
        _seq(generated=[5, 5], temperature=0, frequency_penalty=0.06),       # 2.0 - 2 * 0.06
        _seq(generated=[5], temperature=0, frequency_penalty=0.06),          # 2.0 - 0.06 > 1.9
        _seq(temperature=0, logit_bias=((7, 100.0),)),
        _seq(temperature=0, logit_bias=((5, -100.0),)),
        # the bias comes first, then the penalty (vLLM's order): (-1 + 6) / 2 > 2, but (-1 + 4) / 2 < 2
        _seq(prompt=[7], generated=[7], temperature=0, repetition_penalty=2.0, logit_bias=((7, 6.0),)),
        _seq(prompt=[7], generated=[7], temperature=0, repetition_penalty=2.0, logit_bias=((7, 4.0),)),
    ]
    tokens, lps = sample(_logits(*[row] * len(seqs)), seqs)
    assert tokens == [5, 6, 6, 6, 6, 5, 7, 6, 7, 5] and lps is None


def test_top_k_min_p_and_seeds_per_row():
    row = {1: 1.0, 2: 0.9, 3: 0.8}
    for params in ({"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}):
        tokens, _ = sample(_logits(*[row] * 20), [_seq(temperature=1.5, seed=i, **params) for i in range(20)])
        assert tokens == [1] * 20, params
    # top_k=2 never draws the third token; without it, some of 200 seeds do
    tokens, _ = sample(_logits(*[row] * 200), [_seq(temperature=2.0, seed=i, top_k=2) for i in range(200)])
    assert set(tokens) == {1, 2}
    tokens, _ = sample(_logits(*[row] * 200), [_seq(temperature=2.0, seed=i) for i in range(200)])
    assert {1, 2, 3} <= set(tokens)
    # a seeded row draws the same token alone or among rows with other parameters
    alone, _ = sample(_logits(row), [_seq(temperature=1.0, seed=42, top_p=0.9)])
    mixed, _ = sample(_logits({1: 3.0}, row, row), [_seq(temperature=0, presence_penalty=1.0),
                                                    _seq(temperature=1.0, seed=42, top_p=0.9),
                                                    _seq(temperature=0.5, seed=1, min_p=0.2, logprobs=2)])
    assert mixed[1] == alone[0]


def test_logprobs_are_the_models_own():
    logits = _logits({1: 1.0, 2: 0.5, 3: 0.2}, {4: 2.0})
    seqs = [_seq(temperature=0, logprobs=2, repetition_penalty=2.5, generated=[1]), _seq(temperature=0)]
    tokens, lps = sample(logits, seqs)
    ref = torch.log_softmax(logits[0], -1)
    assert set(lps) == {0} and lps[0].token == tokens[0] == 2  # the penalty chose 2; the logprob is the model's
    assert math.isclose(lps[0].logprob, float(ref[2]), rel_tol=1e-6)
    assert [t for t, _ in lps[0].top] == [1, 2] and math.isclose(lps[0].top[0][1], float(ref[1]), rel_tol=1e-6)


def test_penalty_state_follows_the_appended_tokens():
    """A penalised sequence's state is made once, then follows each appended token: the shaped logits equal the
    dense formula over counts of the whole completion (vLLM's: logits - frequency x count - presence x
    [count > 0], after the repetition penalty on every token of the prompt or the completion). A row a finished
    sequence released starts clean for the next one, and more sequences than rows grow the state."""
    from collections import Counter

    from stemma.serve.engine import Penalties, _shape

    def reference(logits, s, freq, presence, rep):
        counts = torch.zeros(1, V)
        for tok, c in Counter(s.generated).items():
            counts[0, tok] = c
        seen = counts > 0
        seen[0, s.prompt] = True
        ref = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
        return ref - freq * counts - presence * (counts > 0)

    state = Penalties(1, V)
    logits = torch.linspace(-3, 3, V)[None, :]
    s = _seq(prompt=(5, 6, 5), generated=[1, 2], temperature=0, frequency_penalty=0.5, presence_penalty=0.25,
             repetition_penalty=2.0)
    for t in (3, 1, 1, 7, 2, 5, None):
        x = _shape(logits, [s], state)
        assert torch.allclose(x, reference(logits, s, 0.5, 0.25, 2.0)), t
        assert list(state.rows) == [s.id]
        if t is not None:
            s.generated.append(t)
    state.release(s)
    # the next sequence takes the freed row: nothing of the first one's penalties remains
    s2 = _seq(prompt=(3,), generated=[4], temperature=0, presence_penalty=1.0)
    assert torch.allclose(_shape(logits, [s2], state), reference(logits, s2, 0.0, 1.0, 1.0))
    assert state.subtract.shape[0] == 1
    # two at once on one row's worth of state: it grows, and each row is its own sequence's
    s3 = _seq(prompt=(2,), generated=[6, 6], temperature=0, frequency_penalty=0.1, repetition_penalty=1.5)
    x = _shape(logits.expand(2, V), [s2, s3], state)
    assert state.subtract.shape[0] == 2
    assert torch.allclose(x[0], reference(logits, s2, 0.0, 1.0, 1.0)[0])
    assert torch.allclose(x[1], reference(logits, s3, 0.1, 0.0, 1.5)[0])
    # without a state (a one-off call), the same from each sequence's whole completion
    assert torch.allclose(_shape(logits.expand(2, V), [s3, s2]), torch.stack([x[1], x[0]]))


@pytest.fixture(scope="module")
def openai_client(tree_ws):
    openai = pytest.importorskip("openai")
    with ServerThread(create_app(tree_ws, ServeConfig(max_batch=16))) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0), openai


def test_openai_client_sampling_parameters(openai_client):
    client, openai = openai_client
    kw = {"model": "en/software", "prompt": "The ls command", "max_tokens": 24, "temperature": 0}
    plain = client.completions.create(**kw).choices[0].text
    again = client.completions.create(**kw, extra_body={"repetition_penalty": 1.0, "top_k": -1, "min_p": 0.0})
    assert again.choices[0].text == plain
    penalised = client.completions.create(**kw, extra_body={"repetition_penalty": 1.8}).choices[0].text
    assert penalised != plain
    first = client.completions.create(**kw, presence_penalty=2.0, frequency_penalty=2.0).choices[0].text
    assert first != plain
    # the engine's penalty row of the finished request is reused clean: the same request gives the same text
    assert client.completions.create(**kw, presence_penalty=2.0, frequency_penalty=2.0).choices[0].text == first
    ids = client.completions.create(model="en/software", prompt=[[5]], max_tokens=3, temperature=0.7, seed=1,
                                    logit_bias={"100": 100}, extra_body={"ignore_eos": True})
    top1 = client.completions.create(**kw, seed=3, extra_body={"top_k": 1, "temperature": 1.3})
    assert top1.choices[0].text == plain  # top-k 1 samples the argmax
    assert ids.usage.completion_tokens == 3

    c = client.completions.create(**kw, logprobs=2)
    lp = c.choices[0].logprobs
    assert c.choices[0].text == plain and len(lp.tokens) == c.usage.completion_tokens
    assert "".join(lp.tokens) == plain and lp.text_offset[0] == 0
    assert all(x <= 0 for x in lp.token_logprobs) and all(1 <= len(d) <= 3 for d in lp.top_logprobs)
    chunks = list(client.completions.create(**kw, logprobs=1, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.tokens]
    assert streamed == lp.tokens

    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(model="en/software", messages=msgs, max_tokens=8, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob for t in content)  # greedy: the chosen one is the top one
    assert chat.choices[0].message.content.startswith(content[0].token.strip()[:1])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**kw, logprobs=6)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**kw, logit_bias={"999999": 5})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="en/software", messages=msgs, top_logprobs=2)
