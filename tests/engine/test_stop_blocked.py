"""Blocked strings (SamplingParams.blocked_strings, an operator's content filter): StopChecker against a whole-text
reference over many splits, beside stop strings and min_tokens; the ASCII-only case folding; and the engine's
finish_reason "content_filter" with the text cut before the term, streamed or not."""

from __future__ import annotations

import asyncio
import pickle
import random

import pytest

from glm_serve.engine.async_engine import AsyncEngine
from glm_serve.engine.stop import BlockedStrings, StopChecker, fold
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams

from .test_stop import _split


def _reference(deltas: list[str], stops: list[str], blocked: list[str], include: bool,
               min_tokens: int) -> tuple[str, str | None]:
    """Whole text at once: the match ending first wins (at one end: a blocked string, then the longest); stop
    strings only where they end after the first min_tokens - 1 deltas, blocked strings anywhere, in folded text.
    -> (text emitted, "stop" | "content_filter" | None)."""
    text = "".join(deltas)
    unchecked = len("".join(deltas[:max(0, min_tokens - 1)]))
    folded = fold(text)
    best = None  # (end, blocked first, -length, start, kind)
    for kind, strings, haystack in (("stop", stops, text), ("content_filter", blocked, folded)):
        for s in strings:
            needle = fold(s) if kind == "content_filter" else s
            start = haystack.find(needle)
            while start >= 0:
                end = start + len(s)
                if kind == "content_filter" or end > unchecked:
                    key = (end, kind == "stop", -len(s), start, kind)
                    best = key if best is None or key < best else best
                start = haystack.find(needle, start + 1)
    if best is None:
        return text, None
    end, _, _, start, kind = best
    return text[:end if include and kind == "stop" else start], kind


def _run(deltas, stops, blocked, include=False, min_tokens=0):
    checker = StopChecker(stops, include_stop_str=include, min_tokens=min_tokens,
                          blocked=BlockedStrings(blocked) if blocked else None)
    out = []
    for delta in deltas:
        emit, stopped = checker.feed(delta)
        out.append(emit)
        if stopped:
            return "".join(out), checker.reason, out
    out.append(checker.flush())
    return "".join(out), None, out


@pytest.mark.parametrize("alphabet", ["abAB", "你好坏aA"])
@pytest.mark.parametrize("include", [False, True])
def test_random_texts_splits_stops_and_min_tokens_match_the_reference(alphabet, include):
    rng = random.Random(f"blocked{alphabet}{include}")
    checked = 0
    for _ in range(500):
        word = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))  # noqa: E731
        stops = [word() for _ in range(rng.randint(0, 2))]
        blocked = [word() for _ in range(rng.randint(1, 3))]
        deltas = _split("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))), rng)
        min_tokens = rng.choice([0, 0, rng.randint(0, len(deltas) + 1)])
        got, kind, pieces = _run(deltas, stops, blocked, include, min_tokens)
        assert (got, kind) == _reference(deltas, stops, blocked, include, min_tokens), (deltas, stops, blocked)
        # The guarantee itself: no blocked string in what went out, in any case.
        assert not any(fold(b) in fold(got) for b in blocked), (deltas, blocked, got)
        checked += kind == "content_filter"
    assert checked > 100  # the cases were not all trivial


def test_a_term_split_over_many_deltas_is_never_emitted_in_part():
    text = "The secret word is PassWord and more"
    got, kind, pieces = _run(list(text), [], ["password"])
    assert (got, kind) == ("The secret word is ", "content_filter")
    # "P", "a", ... were held back: nothing of the term went out before the match was certain
    assert "".join(pieces) == "The secret word is "


def test_ascii_letters_fold_other_characters_stay_exact():
    assert _run(["x", "ABC", "d"], [], ["abc"])[:2] == ("x", "content_filter")
    assert _run(["xabcd"], [], ["ABC"])[:2] == ("x", "content_filter")
    # Non-ASCII letters are matched exactly: Ä is not ä, and the full casefold's ß -> ss does not apply.
    assert _run(["Äb"], [], ["äB"])[:2] == ("Äb", None)
    assert _run(["xÄb"], [], ["ÄB"])[:2] == ("x", "content_filter")
    assert _run(["strasse"], [], ["straße"])[:2] == ("strasse", None)
    # Chinese, split inside the term
    assert _run(["今天天", "气很", "坏。"], [], ["天气很坏"])[:2] == ("今天", "content_filter")
    assert _run(["今天天气很好"], [], ["天气很坏"])[:2] == ("今天天气很好", None)


def test_a_term_that_is_also_a_stop_string_is_blocked_even_with_include_stop_str():
    for include in (False, True):
        got, kind, _ = _run(["say ", "bad", " word"], ["bad"], ["BAD"], include)
        assert (got, kind) == ("say ", "content_filter")
    # A stop string kept by include_stop_str that ends with a blocked string: the blocked string wins the tie.
    assert _run(["x", "ab", "c"], ["xab"], ["ab"], include=True)[:2] == ("x", "content_filter")
    # A stop string ending first still stops as a stop string.
    assert _run(["x", "ab", "c"], ["xa"], ["abc"], include=True)[:2] == ("xa", "stop")


def test_blocked_strings_are_checked_before_min_tokens():
    checker = StopChecker(["ab"], min_tokens=5, blocked=BlockedStrings(["zz"]))
    assert checker.feed("ab") == ("ab", False)  # a stop string: ignored before min_tokens
    assert checker.feed("z") == ("", False)
    assert checker.feed("z") == ("", True) and checker.reason == "content_filter"


def test_sampling_params_field():
    shared = BlockedStrings(["x", "y"])
    assert SamplingParams(blocked_strings=shared).blocked_strings is shared  # compiled once, shared as is
    assert SamplingParams(blocked_strings=["a", "a"]).blocked_strings.terms == ("a",)
    assert SamplingParams(blocked_strings=[]).blocked_strings is None
    assert SamplingParams().blocked_strings is None
    for bad in ("abc", [""], [3], {"a": 1}):
        with pytest.raises(ValueError, match="blocked_strings"):
            SamplingParams(blocked_strings=bad)
    # To an engine process: as its terms, compiled once there
    assert pickle.loads(pickle.dumps(shared)) is shared


def test_stop_checker_takes_a_plain_list_too():
    checker = StopChecker([], blocked=["Zz"])
    assert checker.feed("azZ") == ("a", True) and (checker.reason, checker.matched) == ("content_filter", "Zz")


def test_find_in_whole_texts():
    b = BlockedStrings(["Foo", "坏词"])
    assert b.find_in("a FOO b") == "Foo" and b.find_in("这是坏词") == "坏词"
    assert b.find_in("fo o 坏 词") is None


@pytest.fixture(scope="module")
def llm(tiny_hf):
    return LLM(str(tiny_hf), kv_cache_tokens=2048)


def _term_across_tokens(llm, ids):
    """A piece of the greedy answer to `ids` that spans a token boundary and first occurs there -> (term,
    where the term starts in the text)."""
    tok = llm.tokenizer
    pieces = [tok.decode([t]) for t in ids]
    text = "".join(pieces)
    at = 0
    for k in range(1, len(pieces)):
        at += len(pieces[k - 1])
        a, b = pieces[k - 1], pieces[k]
        term = a[-2:] + b[:2]
        if len(a) >= 2 and len(b) >= 2 and "\ufffd" not in term and term.strip() == term and \
                fold(text).find(fold(term)) == at - 2 and k > 2:
            return term, at - 2
    raise AssertionError(f"no term spanning two tokens in {pieces!r}")


def test_engine_cuts_before_the_term_with_finish_reason_content_filter(llm):
    prompt = [{"role": "user", "content": "写一首诗"}]
    base = SamplingParams(temperature=0.0, max_tokens=30)
    [free] = llm.generate([prompt], base, use_tqdm=False)
    term, at = _term_across_tokens(llm, free.token_ids)
    blocked = term.swapcase()  # ASCII letters in the other case still match
    [cut] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, blocked_strings=[blocked]),
                         use_tqdm=False)
    ch = cut.choices[0]
    assert (ch.text, ch.finish_reason) == (free.text[:at], "content_filter")
    assert cut.token_ids == free.token_ids[:len(cut.token_ids)] and len(cut.token_ids) < len(free.token_ids)

    # Streamed, one delta per token: the deltas join to the same text; none carries part of the term.
    engine = llm.engine
    ids, _ = llm.encode(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=30, blocked_strings=[blocked])

    async def stream():
        aeng = AsyncEngine(engine)
        try:
            return [o async for o in aeng.generate("s", ids, params)]
        finally:
            aeng.shutdown()

    outs = [o for r in asyncio.run(stream()) for o in r.outputs]
    assert len(outs) > 3
    assert "".join(o.text for o in outs) == free.text[:at]
    assert (outs[-1].finish_reason, outs[-1].stop_reason) == ("content_filter", blocked)
    # Other terms that never occur change nothing; neither does an empty list.
    [same] = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, blocked_strings=["zzzq"]),
                          use_tqdm=False)
    assert (same.text, same.choices[0].finish_reason) == (free.text, free.choices[0].finish_reason)
