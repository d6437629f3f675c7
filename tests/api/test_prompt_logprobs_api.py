"""/v1/completions with echo and logprobs, as evaluation harnesses call it (lm-evaluation-harness's
`local-completions`: token-id prompts, `echo: true, logprobs: 1, max_tokens: 0`), through the `openai` SDK and
checked against the float32 HF transformers reference loglikelihood."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from transformers import GlmForCausalLM as HFGlm

from glm_serve.api.responses import token_text
from glm_serve.model.simple import generate_simple

from .conftest import wait_idle

MODEL = "glm-4-tiny"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(api_key="unused", base_url=server.openai_base, max_retries=0)


@pytest.fixture(scope="module")
def ref(tiny_hf):
    return HFGlm.from_pretrained(tiny_hf, dtype=torch.float32).eval()


def _ids(server, text: str) -> list[int]:
    return server.engine.engine.tokenizer.encode(text)


def _loglikelihood(ref, ids: list[int], ctxlen: int) -> tuple[float, bool]:
    """Sum of log p(ids[i] | ids[:i]) over i >= ctxlen, and whether each of those is the argmax."""
    with torch.inference_mode():
        lp = ref(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    rows = range(ctxlen, len(ids))
    return sum(lp[i - 1, ids[i]].item() for i in rows), all(lp[i - 1].argmax().item() == ids[i] for i in rows)


def test_harness_loglikelihood(client, server, ref):
    """A batch of (context + continuation) prompts, echo, logprobs 1, max_tokens 0: the prompt alone comes back
    with one logprob per token (null first), and the continuation's sum is the reference loglikelihood."""
    tok = server.engine.engine.tokenizer
    pairs = [("The capital of France is", " Paris"), ("1 2 3", " 4 5 6 7"), ("a", " b")]
    prompts = [_ids(server, c + x) for c, x in pairs]
    greedy = _ids(server, "once upon")  # + the model's own greedy continuation: is_greedy must say so
    pairs.append(("once upon", None))
    prompts.append(greedy + generate_simple(server.engine.engine.model, greedy, 3))
    r = client.completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=0, temperature=0)
    assert len(r.choices) == len(prompts)
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == sum(map(len, prompts))
    for (ctx, _), ids, choice in zip(pairs, prompts, r.choices):
        lps = choice.logprobs
        assert choice.finish_reason == "length" and choice.text == tok.decode(ids)
        assert lps.tokens == [token_text(tok, t)[0] for t in ids]
        assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
        assert len(lps.token_logprobs) == len(lps.top_logprobs) == len(lps.text_offset) == len(ids)
        # Offsets index the text: a whole-character token's string lies in its span (a byte fragment takes no
        # room of its own: what it starts shows at the token after it, as the streamed text shows it).
        ends = lps.text_offset[1:] + [len(choice.text)]
        assert lps.text_offset[0] == 0 and lps.text_offset == sorted(lps.text_offset)
        for t, at, end in zip(lps.tokens, lps.text_offset, ends):
            assert "\ufffd" in t or t in choice.text[at:end]
        ctxlen = len(_ids(server, ctx))
        want, want_greedy = _loglikelihood(ref, ids, ctxlen)
        assert want_greedy == (ctx == "once upon")
        assert sum(lps.token_logprobs[ctxlen:]) == pytest.approx(want, abs=1e-4)
        # The harness's is_greedy: each continuation token's logprob is the best of its top-1.
        assert all(lp == max(top.values()) for lp, top in zip(lps.token_logprobs[ctxlen:],
                                                               lps.top_logprobs[ctxlen:])) == want_greedy
        assert all(len(top) == 1 for top in lps.top_logprobs[1:])
    wait_idle(server.engine)


def test_echo_then_generated_tokens_and_stream(client, server, ref):
    """max_tokens > 0: the prompt's entries, then the generated tokens' as without echo (offsets after the
    echoed text). Streamed, the prompt's part comes in the first chunk and the pieces add up to the body."""
    ids = _ids(server, "hello there, how are you")
    plain = client.completions.create(model=MODEL, prompt=ids, logprobs=2, max_tokens=4, temperature=0)
    body = client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=2, max_tokens=4, temperature=0)
    lps, gen = body.choices[0].logprobs, plain.choices[0].logprobs
    P = len(ids)
    assert body.choices[0].text == server.engine.engine.tokenizer.decode(ids) + plain.choices[0].text
    assert lps.tokens[P:] == gen.tokens and lps.token_logprobs[P:] == pytest.approx(gen.token_logprobs)
    # the same alternatives; their values from another computation (the echoed request's prefill computes every
    # position's logits, a matmul of another shape than the plain one's last row alone) may differ in the last bits
    assert [top.keys() for top in lps.top_logprobs[P:]] == [top.keys() for top in gen.top_logprobs]
    for top, want in zip(lps.top_logprobs[P:], gen.top_logprobs):
        assert [top[t] for t in want] == pytest.approx([want[t] for t in want], abs=1e-4)
    prompt_text = len(body.choices[0].text) - len(plain.choices[0].text)
    assert lps.text_offset[P:] == [prompt_text + o for o in gen.text_offset]
    assert sum(lps.token_logprobs[1:P]) == pytest.approx(_loglikelihood(ref, ids, 1)[0], abs=1e-4)
    chunks = list(client.completions.create(model=MODEL, prompt=ids, echo=True, logprobs=2, max_tokens=4,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0].logprobs
    assert first.tokens[:P] == lps.tokens[:P] and first.token_logprobs[0] is None
    pieces = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for p in pieces for t in p.tokens] == lps.tokens
    # Offsets are the same streamed or not (each token's advance is the text it makes, held back or not).
    assert [v for p in pieces for v in p.text_offset] == lps.text_offset
    streamed = [v for p in pieces for v in p.token_logprobs]
    assert streamed[0] is None and streamed[1:] == pytest.approx(lps.token_logprobs[1:])
    assert "".join(c.choices[0].text for c in chunks) == body.choices[0].text
    wait_idle(server.engine)


def test_max_tokens_zero(client, server):
    """With echo and no logprobs: the prompt's text alone. Without echo: still a 400 (nothing to return)."""
    ids = _ids(server, "just the prompt")
    r = client.completions.create(model=MODEL, prompt=ids, echo=True, max_tokens=0)
    assert r.choices[0].text == "just the prompt" and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 0 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=0)
    assert e.value.code == "1210" and e.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError):  # chat never takes 0
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=0)
    # n > 1: every choice echoes the same prompt logprobs (recorded once, by the first choice).
    raw = httpx.post(server.openai_base + "/completions", json={"model": MODEL, "prompt": ids, "echo": True,
                                                               "logprobs": 0, "max_tokens": 2, "n": 2})
    assert raw.status_code == 200, raw.text
    a, b = (c["logprobs"] for c in raw.json()["choices"])
    P = len(ids)
    assert a["token_logprobs"][:P] == b["token_logprobs"][:P] and a["token_logprobs"][0] is None
    assert a["top_logprobs"][1:P] == [{}] * (P - 1)  # logprobs 0: the token's own logprob only
    wait_idle(server.engine)
