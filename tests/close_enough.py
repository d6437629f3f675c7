"""assert_same: two results equal, floats aside, which may differ in their last bits (tests/ is on sys.path: test
modules import it by name).

Two engines, or one engine in two runs, may batch the same requests differently (requests arrive in other steps,
crossing a pipe or not): a prompt prefilled beside other rows goes through matmuls of another shape, and its
logprobs come out a few ulps apart (CI once saw -5.1181240 against -5.1181235). Token ids, text and finish reasons
must still be identical."""

from __future__ import annotations

import dataclasses

import pytest


def assert_same(got, want, abs_tol: float = 1e-4, where: str = "result") -> None:
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=abs_tol), where
    elif dataclasses.is_dataclass(want):
        assert type(got) is type(want), where
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), abs_tol, f"{where}.{f.name}")
    elif isinstance(want, (list, tuple)):
        assert type(got) is type(want) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, abs_tol, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            assert_same(got[k], want[k], abs_tol, f"{where}[{k!r}]")
    else:
        assert got == want, (where, got, want)
