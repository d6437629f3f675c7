"""Incremental parsing of one choice's answer into content or a tool call, for streaming and non-streaming alike.

GLM-4 answers start with "\\n" (the separator after <|assistant|>) for content, or with `name\\n{json}` for a
tool call. The parser holds text back until its first characters decide which: "\\n" first -> content (that
newline dropped); a known function name followed by "\\n" -> a call whose arguments stream after it (leading and
trailing whitespace trimmed); anything else -> content as written. Non-streaming responses are assembled from
the same deltas, so a stream always concatenates to the non-streamed answer.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass


@dataclass
class Delta:
    content: str | None = None  # content text
    call_id: str | None = None  # set once, on the delta that opens the tool call
    name: str | None = None  # the function name (with call_id)
    arguments: str | None = None  # a piece of the call's arguments


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class ChoiceParser:
    """Feed text deltas; get content or tool-call deltas. `tool_names` empty: everything is content."""

    def __init__(self, tool_names: frozenset[str] = frozenset(), forced: bool = False, raw: bool = False):
        self.tool_names = tool_names
        # tool_choice required or named: the grammar makes the answer a call, so text held back at the end is a
        # call cut short (max_tokens) inside its name, not content: it is dropped
        self.forced = forced
        # raw: the text is content as it comes, separator and all (an answer continued from the prompt's own
        # start of it, or a prompt without <|assistant|>: the model's text does not open an answer)
        self._mode = "content" if raw else "start"  # start (undecided) | content | call
        self._buf = ""  # text held back while undecided
        self._pending_ws = ""  # call mode: trailing whitespace not yet known to be inside the arguments
        self._args_started = False
        self.call_id: str | None = None
        self.call_name: str | None = None

    @property
    def is_call(self) -> bool:
        return self._mode == "call"

    def feed(self, text: str) -> list[Delta]:
        if not text:
            return []
        if self._mode == "content":
            return [Delta(content=text)]
        if self._mode == "call":
            return self._args(text)
        self._buf += text
        return self._decide(final=False)

    def finish(self) -> list[Delta]:
        """End of the answer: text still held back is content (unless the call was forced: see __init__)."""
        if self._mode == "start":
            if self.forced:
                self._buf = ""
                return []
            return self._decide(final=True)
        return []  # call mode drops trailing whitespace; content mode holds nothing

    def _decide(self, final: bool) -> list[Delta]:
        buf = self._buf
        if not buf:
            return []
        if buf[0] == "\n":
            return self._to_content(buf[1:])
        if not self.tool_names:
            return self._to_content(buf)
        name, sep, rest = buf.partition("\n")
        if sep:
            if name in self.tool_names:
                self._mode, self._buf = "call", ""
                self.call_id, self.call_name = new_call_id(), name
                return [Delta(call_id=self.call_id, name=name), *self._args(rest)]
            return self._to_content(buf)
        could_be_name = not any(c.isspace() for c in name) and any(t.startswith(name) for t in self.tool_names)
        if final or not could_be_name:
            return self._to_content(buf)
        return []

    def _to_content(self, text: str) -> list[Delta]:
        self._mode, self._buf = "content", ""
        return [Delta(content=text)] if text else []

    def _args(self, text: str) -> list[Delta]:
        text = self._pending_ws + text
        if not self._args_started:
            text = text.lstrip()
            if not text:
                self._pending_ws = ""
                return []
            self._args_started = True
        body = text.rstrip()
        self._pending_ws = text[len(body):]
        return [Delta(arguments=body)] if body else []


@dataclass
class ParsedChoice:
    """A finished choice assembled from its deltas (non-streaming responses)."""

    content: str | None
    tool_calls: list[dict]


def assemble(deltas: list[Delta]) -> ParsedChoice:
    content, calls = [], []
    for d in deltas:
        if d.content is not None:
            content.append(d.content)
        if d.call_id is not None:
            calls.append({"id": d.call_id, "type": "function", "function": {"name": d.name, "arguments": ""}})
        if d.arguments is not None:
            calls[-1]["function"]["arguments"] += d.arguments
    if calls:
        return ParsedChoice(None, calls)
    return ParsedChoice("".join(content), [])
