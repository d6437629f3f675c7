"""The operator's content filter (`serve --blocked-words FILE`): reading the word list, and refusing a request
whose input holds a term (400, code 1301 "content blocked"; OpenAI's shape: code "content_filter"). Output is
the engine's part: the same terms ride on every request's SamplingParams.blocked_strings (engine/stop.py), so an
answer ends just before a term with finish_reason `sensitive` (vendor) / `content_filter` (OpenAI).

Matching, input and output alike: ASCII letters in either case, every other character exactly (engine.stop.fold).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from glm_serve.api.errors import APIError
from glm_serve.engine.stop import BlockedStrings

log = logging.getLogger(__name__)


def read_blocked_words(path: str | Path) -> list[str]:
    """The terms of a word list: UTF-8, one term a line; blank lines and lines starting with `#` are skipped,
    and a term is its line without the surrounding whitespace. ValueError (a start-up error) for a file that is
    missing, unreadable, not UTF-8, or holds no term."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8-sig")  # (a BOM, as Windows editors write one, is no term's start)
    except FileNotFoundError:
        raise ValueError(f"--blocked-words: {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"--blocked-words: {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # a folder, no permission
        raise ValueError(f"--blocked-words: cannot read {path} ({e.strerror or e})") from None
    terms = [line.strip() for line in text.splitlines()]
    terms = [t for t in terms if t and not t.startswith("#")]
    if not terms:
        raise ValueError(f"--blocked-words: {path} holds no term (one a line; blank lines and # comments are "
                         "skipped); leave the flag out to serve without a content filter")
    return list(dict.fromkeys(terms))


class ContentFilter:
    """A server's blocked terms: refuses inputs that hold one; `terms` goes on every request's SamplingParams."""

    def __init__(self, terms: list[str], on_block=None):
        self.terms = BlockedStrings(terms)  # compiled once, shared by every request
        self._on_block = on_block  # called for each request refused (metrics)

    def check_messages(self, messages: list) -> None:
        """A chat's messages (validated by glm_serve.chat): any role's text, tool calls' names and arguments,
        tool results. Each text on its own: a term split over two messages is not one in either."""
        for i, m in enumerate(messages):
            for text in _message_texts(m):
                if self.terms.find_in(text) is not None:
                    self._refuse(f"messages[{i}]", "messages")

    def check_prompt(self, text: str, where: str = "prompt") -> None:
        """A legacy completion's prompt, as text (token-id prompts decoded: they are text too)."""
        if self.terms.find_in(text) is not None:
            self._refuse(where, "prompt")

    def _refuse(self, where: str, param: str):
        if self._on_block is not None:
            self._on_block()
        log.info("request refused by the content filter (%s)", where)
        # The message does not name the term: the list is the operator's, and an answer naming what matched would
        # read it out to anyone who asks (the vendor's 1301 does not name it either). Where it is helps the user.
        raise APIError("1301", f"content blocked: {where} holds a term this server's content filter does not allow",
                       param)


def _message_texts(m) -> list[str]:
    if not isinstance(m, dict):
        return []
    out = []
    content = m.get("content")
    if isinstance(content, str):
        out.append(content)
    elif isinstance(content, list):
        out += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
    if isinstance(m.get("name"), str):
        out.append(m["name"])
    for call in m.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            continue
        if isinstance(fn.get("name"), str):
            out.append(fn["name"])
        args = fn.get("arguments")
        if args is not None:  # a JSON string, or (some clients) the object itself, rendered as the prompt has it
            out.append(args if isinstance(args, str) else json.dumps(args, ensure_ascii=False))
    return out
