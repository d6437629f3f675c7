"""Our clients' SSE line reader (glm_serve/sse_lines.py): lines end at CR, LF or CRLF only, whatever the chunking
(a CRLF or a UTF-8 character cut between chunks), never at U+2028, U+2029 or U+0085, which httpx's iter_lines
splits at (and the JSON of an event from another server may hold raw)."""

from __future__ import annotations

import asyncio
import random

from glm_serve.sse_lines import aiter_sse_lines, iter_sse_lines


def _chunks(data: bytes, rng: random.Random) -> list[bytes]:
    if len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 12))))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]


def test_lines_split_only_at_cr_lf_crlf_whatever_the_chunks():
    rng = random.Random(7)
    pieces = ["data: {\"x\": \"a\u2028b\"}", "data: \u2029\u0085 tail", "", "event: y", "data: 中文 ok", "data: [DONE]"]
    for _ in range(300):
        lines = [rng.choice(pieces) for _ in range(rng.randrange(1, 8))]
        ends = [rng.choice(["\n", "\r", "\r\n"]) for _ in lines]
        if rng.random() < 0.3:
            ends[-1] = ""  # a last line without its end
        for i in range(len(lines) - 1):  # "x\r" + "" + "\n..." is "x\r\n": one line end, not two
            if ends[i] == "\r" and lines[i + 1] == "" and ends[i + 1].startswith("\n"):
                ends[i] = "\n"
        data = "".join(line + end for line, end in zip(lines, ends)).encode()
        want = list(lines)
        if ends[-1] == "" and lines[-1] == "":
            want.pop()  # an empty unterminated tail is no line
        chunks = _chunks(data, rng)
        assert list(iter_sse_lines(chunks)) == want, (data, chunks)

        async def collect():
            async def gen():
                for c in chunks:
                    yield c
            return [line async for line in aiter_sse_lines(gen())]

        assert asyncio.run(collect()) == want
