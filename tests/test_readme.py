"""The README's command lines and serve flag table against the real parsers: a flag the README shows must exist,
and every flag of `glm-serve serve` must have its row (with the default the parser has, where the row states one).
The README grew over many sessions; these checks keep its flags from drifting away from the code again."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from glm_serve.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}


def _commands_block() -> str:
    start = README.index("## Commands")
    return README[README.index("```bash", start):README.index("```\n", README.index("```bash", start) + 7)]


def _serve_table() -> list[str]:
    start = README.index("`glm-serve serve` flags:")
    rows = []
    for line in README[start:].splitlines()[1:]:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    return rows[2:]  # without the header and its rule


def test_commands_block_flags_exist():
    subs = _subparsers()
    current = None
    for line in _commands_block().splitlines():
        m = re.match(r"glm-serve ([a-z-]+)", line)
        if m:
            current = m.group(1)
        if current is None:
            continue
        known = _options(subs[current])
        for flag in FLAG.findall(line.split("#", 1)[0]):
            assert flag in known, f"README's Commands block: glm-serve {current} has no {flag}"


def test_serve_table_names_every_serve_flag_and_no_other():
    known = _options(_subparsers()["serve"])
    named = {f for row in _serve_table() for f in FLAG.findall(row.split(" | ")[0])}
    assert named - set(known) == set(), "README's serve table names flags `glm-serve serve` does not have"
    assert set(known) - named == set(), "flags of `glm-serve serve` missing from the README's serve table"


@pytest.mark.parametrize("flag,stated", [("--port", "8000"), ("--max-body-mb", "32"), ("--shutdown-timeout", "30"),
                                         ("--stream-interval", "1"), ("--gpu-memory-utilization", "0.9")])
def test_serve_table_defaults(flag, stated):
    row = next(r for r in _serve_table() if f"`{flag}" in r.split(" | ")[0])
    assert stated in row.split(" | ")[1]
    assert float(_options(_subparsers()["serve"])[flag].default) == float(stated)


def test_serve_table_scheduler_defaults():
    # One row for three flags: "16, 256, 2048".
    row = next(r for r in _serve_table() if "`--block-size N`" in r)
    stated = [int(x) for x in row.split(" | ")[1].split(",")]
    opts = _options(_subparsers()["serve"])
    assert stated == [opts["--block-size"].default, opts["--max-num-seqs"].default, opts["--max-batch-tokens"].default]
