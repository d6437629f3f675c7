"""Legacy completions `text_offset`: each token's offset is where its text starts in the choice's text, as the
engine's detokenizer makes that text: a skipped special token takes no room, a character split over two tokens
counts once (at the token that completes it), and one body or one token per stream chunk give the same offsets."""

from __future__ import annotations

from glm_serve.api.responses import TextOffsets, completion_logprobs, echo_logprobs
from glm_serve.engine.outputs import TokenLogprob
from glm_serve.tokenizer import IncrementalDetokenizer, load_tokenizer


def _split_char_ids(tok) -> list[int]:
    """Ids of a text holding a character the tokenizer cuts into two byte tokens (found, not assumed)."""
    for ch in "龘𠀀鬱齉":
        ids = tok.encode(ch)
        if len(ids) > 1:
            return ids
    raise AssertionError("no character of the probe list splits over tokens in this vocabulary")


def test_offsets_follow_the_engine_text(tiny_hf):
    tok = load_tokenizer(tiny_hf)
    special = tok.token_to_id("[gMASK]")
    ids = tok.encode("ab c") + [special] + _split_char_ids(tok) + tok.encode("de")
    detok = IncrementalDetokenizer(tok, None, skip_special_tokens=True)
    pieces = [detok.add(i) for i in ids]
    text = "".join(pieces)
    lps = [TokenLogprob(i, -1.0, []) for i in ids]
    whole = completion_logprobs(tok, lps, TextOffsets(tok, None, True))["text_offset"]
    one_by_one = TextOffsets(tok, None, True)
    streamed = [completion_logprobs(tok, [lp], one_by_one)["text_offset"][0] for lp in lps]
    assert whole == streamed
    for k, piece in enumerate(pieces):
        assert text[whole[k]:whole[k] + len(piece)] == piece
    assert whole[len(tok.encode("ab c")) + 1] == whole[len(tok.encode("ab c"))]  # the special token took none
    # The echoed prompt keeps special tokens: its offsets walk tokenizer.decode(prompt).
    echoed = echo_logprobs(tok, ids, [None] * len(ids))["text_offset"]
    full = tok.decode(ids)
    assert echoed[0] == 0 and echoed[-1] == len(full) - len(tok.decode(ids[-1:]))
