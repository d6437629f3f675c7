"""A stop string that ends in the text the detokenizer releases when a choice ends (the U+FFFD of an unfinished
character) stops the choice like one that ends in a token's own text: the text is cut there and the finish
says so, whether the choice ended by length or on a stop id (found by tests/engine/test_engine_fuzz.py)."""

from __future__ import annotations

import pytest

from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

from .test_engine import ForcedText


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM(str(tiny_hf), kv_cache_tokens=1024)


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("end", ["length", "stop id"])
def test_a_stop_string_ending_in_the_flushed_text_stops_the_choice(llm, end, include):
    tok = llm.tokenizer
    [A] = tok.encode("A", allow_special=False)
    # A lone UTF-8 lead byte: no text of its own, U+FFFD once the stream ends unfinished
    LEAD = next(i for i in range(tok.vocab_size) if tok.id_to_token_bytes(i) == b"\xe4")
    stop_id = tok.stop_token_ids[0]
    forced = [A, LEAD, stop_id] if end == "stop id" else [A, LEAD, A]
    params = SamplingParams(temperature=0.0, max_tokens=2 if end == "length" else 3, stop=["A\ufffd"],
                            include_stop_str=include)
    out = llm.engine
    out.add_request("r", [1, 2, 3], params, [ForcedText(forced, 2048)])
    deltas = []
    while out.has_unfinished():
        deltas += [o for r in out.step() for o in r.outputs]
    assert [t for d in deltas for t in d.token_ids] == forced[:params.max_tokens]
    assert "".join(d.text for d in deltas) == ("A\ufffd" if include else "")
    assert (deltas[-1].finish_reason, deltas[-1].stop_reason) == ("stop", "A\ufffd")
