"""Owns reading a server-sent-event stream's lines as the SSE spec splits them, for our own clients (`glm-serve
chat --url`, `glm-serve bench`).

httpx's iter_lines splits where str.splitlines does: also at U+2028, U+2029, U+0085 and other characters a JSON
string may hold raw. An event carrying one would be cut in two and fail to parse. SSE lines end only at CR, LF or
CRLF, so split the bytes there and decode each line whole.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator


_EOL = re.compile(rb"\r\n|\r|\n")


def _split(buf: bytes, chunk: bytes) -> tuple[list[bytes], bytes]:
    """(the complete lines of buf + chunk, the unfinished rest). A CR at the end waits for the next chunk (it may
    be half of a CRLF)."""
    buf += chunk
    hold = b""
    if buf.endswith(b"\r"):
        buf, hold = buf[:-1], b"\r"
    parts = _EOL.split(buf)
    return parts[:-1], parts[-1] + hold


def iter_sse_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    buf = b""
    for chunk in chunks:
        lines, buf = _split(buf, chunk)
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", errors="replace")


async def aiter_sse_lines(chunks: AsyncIterable[bytes]) -> AsyncIterator[str]:
    buf = b""
    async for chunk in chunks:
        lines, buf = _split(buf, chunk)
        for line in lines:
            yield line.decode("utf-8", errors="replace")
    if buf:
        yield buf.rstrip(b"\r").decode("utf-8", errors="replace")
