"""Tests StopChecker against a whole-text reference, over many ways of splitting the text into deltas."""

from __future__ import annotations

import random

import pytest

from glm_serve.engine.stop import StopChecker


def _reference(text: str, stops: list[str], include: bool) -> tuple[str, bool]:
    """Whole text at once: cut at the stop string that ends first (ties: the longest)."""
    best = None
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), -len(stop)) < (best[0] + len(best[1]), -len(best[1]))):
            best = (start, stop)
    if best is None:
        return text, False
    start, stop = best
    return text[:start + len(stop) if include else start], True


def _stream(deltas: list[str], stops: list[str], include: bool = False) -> tuple[str, bool, list[str]]:
    checker = StopChecker(stops, include_stop_str=include)
    out, pieces = [], []
    for delta in deltas:
        emit, stopped = checker.feed(delta)
        out.append(emit)
        pieces.append(emit)
        if stopped:
            return "".join(out), True, pieces
    out.append(checker.flush())
    return "".join(out), False, pieces


def _split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, len(text))))) if text else []
    return [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]


@pytest.mark.parametrize("alphabet", ["ab", "abc", "你好。！"])
@pytest.mark.parametrize("include", [False, True])
def test_random_texts_and_splits_match_whole_text_reference(alphabet, include):
    rng = random.Random(f"{alphabet}{include}")
    for _ in range(400):
        stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        expected = _reference(text, stops, include)
        for _ in range(3):
            got, stopped, _ = _stream(_split(text, rng), stops, include)
            assert (got, stopped) == expected, (text, stops)


def test_stop_string_split_over_many_deltas():
    text = "The answer is 42.<|END|> trailing junk"
    got, stopped, pieces = _stream(list(text), ["<|END|>"])
    assert (got, stopped) == ("The answer is 42.", True)
    # Text that cannot start the stop string goes out at once; only "<|END" was held back.
    assert "".join(pieces[:len("The answer is 42.")]) == "The answer is 42."


def test_text_after_stop_in_same_delta_is_dropped_and_checker_stays_stopped():
    checker = StopChecker(["STOP"])
    assert checker.feed("abc ST") == ("abc ", False)
    assert checker.feed("OP and more") == ("", True)
    assert checker.matched == "STOP"
    assert checker.feed("ignored") == ("", True)
    assert checker.flush() == ""


def test_overlapping_and_prefix_sharing_stops():
    # "aab" inside "aaab": the held "aa" must not hide the match starting one character later.
    assert _stream(list("xaaab"), ["aab"])[:2] == ("xa", True)
    # "ab" completes before "abc" could.
    assert _stream(list("zabc"), ["abc", "ab"])[:2] == ("z", True)
    assert _stream(["zabc"], ["abc", "ab"])[:2] == ("z", True)
    # Same end: the longer stop string (earlier start) wins, whatever the split.
    assert _stream(["xabc"], ["bc", "abc"])[:2] == ("x", True)
    assert _stream(list("xabc"), ["bc", "abc"])[:2] == ("x", True)
    # A false start is released once it can no longer match.
    assert _stream(["ab", "x", "abc"], ["abc"], include=True)[:2] == ("abxabc", True)


def test_include_stop_str_keeps_the_stop_string():
    assert _stream(["Hello", " wor", "ld! bye"], ["world"], include=True)[:2] == ("Hello world", True)


def test_chinese_text():
    text = "你好！我是智谱清言。\n\n用户：下一个问题"
    got, stopped, _ = _stream(list(text), ["用户：", "\n\n用户"])
    assert (got, stopped) == ("你好！我是智谱清言。", True)
    assert _stream(["今天天气", "很好", "。"], ["天气很坏"])[:2] == ("今天天气很好。", False)


def test_no_stop_strings_is_pass_through():
    checker = StopChecker([])
    for delta in ["a", "bc", "", "你好"]:
        assert checker.feed(delta) == (delta, False)
    assert checker.flush() == ""


def test_flush_releases_held_text_when_generation_ends_otherwise():
    checker = StopChecker(["</answer>"])
    assert checker.feed("42 </ans") == ("42 ", False)
    assert checker.flush() == "</ans"
    assert checker.flush() == ""


def test_held_text_is_bounded_by_longest_stop():
    stops = ["x" * 7 + "!", "yz"]
    checker = StopChecker(stops)
    rng = random.Random(0)
    fed = emitted = 0
    for _ in range(2000):
        delta = "x" * rng.randint(0, 4)
        fed += len(delta)
        emit, stopped = checker.feed(delta)
        emitted += len(emit)
        assert not stopped and fed - emitted <= 7
    assert emitted + len(checker.flush()) == fed


@pytest.mark.parametrize("bad", [[""], ["ok", ""], "stop", [3]])
def test_bad_stop_strings_rejected(bad):
    with pytest.raises(ValueError, match="stop_strings"):
        StopChecker(bad)


def _reference_min_tokens(deltas: list[str], stops: list[str], include: bool, min_tokens: int) -> tuple[str, bool]:
    """vLLM's min_tokens rule on the whole text: only a match that ends in the min_tokens-th delta or later
    counts (earliest end first, ties: the longest)."""
    text, unchecked = "".join(deltas), len("".join(deltas[:max(0, min_tokens - 1)]))
    best = None  # (end, -length, start, stop)
    for stop in stops:
        start = text.find(stop)
        while start >= 0:
            end = start + len(stop)
            if end > unchecked and (best is None or (end, -len(stop)) < best[:2]):
                best = (end, -len(stop), start, stop)
            start = text.find(stop, start + 1)
    if best is None:
        return text, False
    return text[:best[0] if include else best[2]], True


@pytest.mark.parametrize("include", [False, True])
def test_min_tokens_ignores_matches_ending_before_it(include):
    rng = random.Random(f"min{include}")
    for _ in range(600):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        deltas = _split("".join(rng.choice("abc") for _ in range(rng.randint(0, 30))), rng)
        min_tokens = rng.randint(0, len(deltas) + 1)
        checker = StopChecker(stops, include_stop_str=include, min_tokens=min_tokens)
        out, stopped = [], False
        for delta in deltas:
            emit, stopped = checker.feed(delta)
            out.append(emit)
            if stopped:
                break
        if not stopped:
            out.append(checker.flush())
        assert ("".join(out), stopped) == _reference_min_tokens(deltas, stops, include, min_tokens), \
            (deltas, stops, min_tokens)


def test_min_tokens_counts_tokens_not_flushed_text():
    checker = StopChecker(["ab"], min_tokens=3)
    assert checker.feed("ab") == ("ab", False)  # token 1: not checked
    assert checker.feed("", token=False) == ("", False)  # a flush is no token: still one checked token to go
    assert checker.feed("ab") == ("ab", False)  # token 2
    assert checker.feed("xab") == ("x", True)  # token 3: checked
