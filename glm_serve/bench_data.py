"""Prompts for `glm-serve bench --dataset FILE`: real conversations instead of windows of a synthetic text, so the
benchmark sees the prompt and answer lengths (and the prefix-cache behaviour) of real traffic.

Formats, told apart by the file's first character:

- ShareGPT (`[` first: a JSON list, as the ShareGPT_V3 dumps that vLLM's and SGLang's benchmarks read): entries
  `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}`; the first human
  turn is the prompt, the reply after it sets the output length (its token count).
- JSONL (anything else): one object a line, `{"prompt": "..."}` or `{"messages": [...]}` (a chat so far), with
  an optional `"output_len": N` or the answer's text in `"completion"` / `"response"` (its token count);
  otherwise `--output-len`.

Prompts are rendered with the checkpoint's chat template (what the server would build from a chat request) and
sent as token ids. Entries are shuffled with the seed and taken in that order; ones too short to time (under 4
prompt or output tokens) or too long for the server's context window are skipped, as vLLM's benchmark does.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MIN_TOKENS = 4  # a prompt or an answer shorter than this says little about latency
_HUMAN = ("human", "user")
_BOT = ("gpt", "assistant", "chatgpt", "bard", "bing")


@dataclass
class DatasetSample:
    prompts: list[tuple[list[int], int]]  # (prompt token ids, output length) per request
    entries_read: int  # entries looked at (shuffled order) to find them
    skipped: dict[str, int]  # why entries were passed over -> how many


def load_dataset(path: str | Path, tokenizer, n: int, seed: int, default_output_len: int,
                 max_model_len: int | None) -> DatasetSample:
    """n (prompt ids, output length) pairs from the dataset at `path` (see the module docstring). ValueError for a
    file that cannot be read or holds no usable entry."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--dataset {path}: cannot read it ({type(e).__name__}: {e})") from None
    entries = _sharegpt(raw, path) if raw.lstrip().startswith("[") else _jsonl(raw, path)
    random.Random(seed).shuffle(entries)
    from glm_serve.chat import encode_chat  # noqa: PLC0415

    prompts: list[tuple[list[int], int]] = []
    skipped = {"unusable": 0, "too_short": 0, "too_long": 0}
    read = 0
    for messages, out_text, out_len in entries:
        if len(prompts) == n:
            break
        read += 1
        if messages is None:
            skipped["unusable"] += 1
            continue
        try:
            ids = encode_chat(tokenizer, messages)
        except ValueError:  # a turn the chat format refuses (glm_serve.chat.ChatFormatError is a ValueError)
            skipped["unusable"] += 1
            continue
        if out_len is None:
            out_len = (len(tokenizer.encode(out_text, allow_special=False)) if out_text is not None
                       else default_output_len)
        if len(ids) < MIN_TOKENS or out_len < MIN_TOKENS:
            skipped["too_short"] += 1
        elif max_model_len is not None and len(ids) + out_len > max_model_len:
            skipped["too_long"] += 1
        else:
            prompts.append((ids, out_len))
    if not prompts:
        raise ValueError(f"--dataset {path}: no usable entry among {read} ({_said(skipped)})")
    return DatasetSample(prompts, read, {k: v for k, v in skipped.items() if v})


Entry = tuple[list[dict] | None, str | None, int | None]  # (chat messages, answer text, output length)


def _sharegpt(raw: str, path: Path) -> list[Entry]:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"--dataset {path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"--dataset {path}: a ShareGPT file is a JSON list of conversations")
    out: list[Entry] = []
    for item in data:
        turns = item.get("conversations") if isinstance(item, dict) else None
        turns = [t for t in turns if isinstance(t, dict)] if isinstance(turns, list) else []
        first = next((k for k, t in enumerate(turns) if t.get("from") in _HUMAN), None)
        reply = next((t for t in turns[first + 1:] if t.get("from") in _BOT), None) if first is not None else None
        prompt = turns[first].get("value") if first is not None else None
        answer = reply.get("value") if reply is not None else None
        if isinstance(prompt, str) and isinstance(answer, str):
            out.append(([{"role": "user", "content": prompt}], answer, None))
        else:
            out.append((None, None, None))
    return out


def _jsonl(raw: str, path: Path) -> list[Entry]:
    out: list[Entry] = []
    for k, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            raise ValueError(f"--dataset {path}, line {k}: not JSON (a JSONL file holds one object a line; a "
                             "ShareGPT file starts with '[')") from None
        if not isinstance(item, dict):
            raise ValueError(f"--dataset {path}, line {k}: expected an object with 'prompt' or 'messages'")
        messages = item.get("messages")
        if isinstance(item.get("prompt"), str):
            messages = [{"role": "user", "content": item["prompt"]}]
        if not (isinstance(messages, list) and messages):
            raise ValueError(f"--dataset {path}, line {k}: expected 'prompt' (a string) or 'messages' (a list)")
        length = item.get("output_len")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ValueError(f"--dataset {path}, line {k}: output_len must be a positive integer, got {length!r}")
        answer = next((item[f] for f in ("completion", "response") if isinstance(item.get(f), str)), None)
        out.append((messages, answer, length))
    return out


def _said(skipped: dict[str, int]) -> str:
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in skipped.items() if v) or "the file is empty"
