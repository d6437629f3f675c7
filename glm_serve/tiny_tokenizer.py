"""Tiny GLM-4 tokenizer files for test checkpoints: a ~2,000-token byte-level BPE in either real on-disk layout.

The BPE is trained at write time from the bundled corpus (glm_serve/data/tiny_corpus.txt: English, Chinese,
code, numbers, emoji) with a fixed procedure, so every run writes the same files. It is expressed the way the
real GLM-4 tokenizer is: tiktoken ranks (rank = id, a lower rank merges first), the 256 single bytes first,
then the 14 special tokens right after the regular vocab in the real order.

    layout "chatglm" (THUDM/glm-4-9b-chat, vendor remote code): tokenizer.model + tokenizer_config.json
    layout "hf"      (THUDM/glm-4-9b-chat-hf):                tokenizer.json  + tokenizer_config.json
"""

from __future__ import annotations

import base64
import heapq
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from glm_serve.tokenizer import GLM4_SPECIAL_TOKENS, GLM4_SPLIT_PATTERN, token_bytes_to_str

CORPUS_PATH = Path(__file__).with_name("data") / "tiny_corpus.txt"
TEMPLATE_PATH = Path(__file__).with_name("templates") / "glm4_chat.jinja"
NUM_REGULAR = 2000  # regular tokens incl. the 256 single bytes


@dataclass(frozen=True)
class TokenizerFiles:
    vocab_size: int  # regular + special tokens (the model's embedding may be padded beyond this)
    special_ids: dict[str, int]  # "<|user|>" -> id, all 14 GLM-4 specials


def train_byte_bpe(text: str, num_tokens: int) -> list[bytes]:
    """Token bytes in rank order: the 256 single bytes, then one token per merge, most frequent pair first.

    Ties break on the pair's ids, so the result depends only on `text`. Words are the GLM-4 pre-tokenizer's
    pieces; pair counts are updated incrementally (only words containing the merged pair are touched)."""
    import regex  # noqa: PLC0415 (\\p{L} needs it; tiktoken depends on it)

    counts = Counter(regex.findall(GLM4_SPLIT_PATTERN, text))
    words = [list(w.encode("utf-8")) for w in counts]  # each word as token ids
    freq = list(counts.values())
    vocab = [bytes([b]) for b in range(256)]
    ids = {b: i for i, b in enumerate(vocab)}
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that (may) contain it
    for wi, w in enumerate(words):
        for p in zip(w, w[1:]):
            pair_count[p] += freq[wi]
            where[p].add(wi)
    heap = [(-c, p) for p, c in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < num_tokens and heap:
        neg, pair = heapq.heappop(heap)
        if pair_count.get(pair) != -neg:
            continue  # stale entry: the count changed and a fresh entry was pushed
        merged = vocab[pair[0]] + vocab[pair[1]]
        new = ids.get(merged)
        if new is None:  # another split made these bytes already: reuse that token, as tiktoken would
            new = ids[merged] = len(vocab)
            vocab.append(merged)
        touched = set()
        for wi in sorted(where.pop(pair)):
            old, out, i = words[wi], [], 0
            while i < len(old):
                if i + 1 < len(old) and (old[i], old[i + 1]) == pair:
                    out.append(new)
                    i += 2
                else:
                    out.append(old[i])
                    i += 1
            if len(out) == len(old):
                continue
            for p in zip(old, old[1:]):
                pair_count[p] -= freq[wi]
                touched.add(p)
            for p in zip(out, out[1:]):
                pair_count[p] += freq[wi]
                where[p].add(wi)
                touched.add(p)
            words[wi] = out
        pair_count.pop(pair, None)
        touched.discard(pair)
        for p in touched:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                del pair_count[p]
    return vocab


@lru_cache(maxsize=1)
def tiny_ranks() -> dict[bytes, int]:
    """The tiny vocabulary as tiktoken ranks (trained once per process, ~1 s)."""
    vocab = train_byte_bpe(CORPUS_PATH.read_text(encoding="utf-8"), NUM_REGULAR)
    return {b: i for i, b in enumerate(vocab)}


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """HF BPE merges equivalent to tiktoken's rule "merge the adjacent pair whose bytes have the lowest rank":
    every split of every token into two tokens is a merge, ordered by the merged token's rank (then the
    halves' ranks), as the tiktoken -> HF converters do."""
    merges = []
    for token, rank in ranks.items():
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    return [(m[3], m[4]) for m in merges]


def tokenizer_json(ranks: dict[bytes, int], special_ids: dict[str, int]) -> dict:
    """tokenizer.json for HF `tokenizers`: GLM-4 split regex + byte-level BPE, specials as added tokens."""
    added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
              "special": True} for t, i in special_ids.items()]

    def special(name: str) -> dict:
        return {"SpecialToken": {"id": name, "type_id": 0}}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GLM4_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        ]},
        # Like the vendor tokenizer, plain encode() prefixes [gMASK]<sop>; chat templates write them themselves.
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special("[gMASK]"), special("<sop>"), {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [special("[gMASK]"), special("<sop>"), {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {name: {"id": name, "ids": [special_ids[name]], "tokens": [name]}
                               for name in ("[gMASK]", "<sop>")},
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
            # A piece that is itself a token is taken whole, as tiktoken does, before any merging.
            "ignore_merges": True,
            "vocab": {token_bytes_to_str(b): i for b, i in ranks.items()},
            "merges": [f"{token_bytes_to_str(a)} {token_bytes_to_str(b)}" for a, b in merges_from_ranks(ranks)],
        },
    }


def tokenizer_config(layout: str, special_ids: dict[str, int], max_position: int) -> dict:
    """tokenizer_config.json as the real checkpoints ship it, with the official chat template."""
    config: dict = {}
    if layout == "chatglm":
        config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}
    config["added_tokens_decoder"] = {
        str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True} for t, i in special_ids.items()}
    config["additional_special_tokens"] = list(special_ids)
    config["chat_template"] = TEMPLATE_PATH.read_text(encoding="utf-8")
    config["clean_up_tokenization_spaces"] = False
    config["do_lower_case"] = False
    config["eos_token"] = "<|endoftext|>"
    config["pad_token"] = "<|endoftext|>"
    if layout == "hf":
        config["model_input_names"] = ["input_ids", "attention_mask"]
    config["model_max_length"] = max_position
    config["padding_side"] = "left"
    config["remove_space"] = False
    config["tokenizer_class"] = "ChatGLM4Tokenizer" if layout == "chatglm" else "PreTrainedTokenizerFast"
    return config


def write_tokenizer_files(out_dir: Path, layout: Literal["hf", "chatglm"],
                          max_position: int = 131072) -> TokenizerFiles:
    """Write the tokenizer part of a tiny checkpoint in `layout`'s real on-disk format."""
    if layout not in ("hf", "chatglm"):
        raise ValueError(f"layout must be 'hf' or 'chatglm', got {layout!r}")
    if not isinstance(max_position, int) or max_position < 1:
        raise ValueError(f"max_position must be a positive int, got {max_position!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ranks = tiny_ranks()
    special_ids = {t: len(ranks) + k for k, t in enumerate(GLM4_SPECIAL_TOKENS)}
    if layout == "chatglm":
        lines = [f"{base64.b64encode(b).decode('ascii')} {i}\n" for b, i in ranks.items()]
        (out_dir / "tokenizer.model").write_text("".join(lines), encoding="utf-8")
    else:
        text = json.dumps(tokenizer_json(ranks, special_ids), ensure_ascii=False, indent=2)
        (out_dir / "tokenizer.json").write_text(text + "\n", encoding="utf-8")
    config = tokenizer_config(layout, special_ids, max_position)
    text = json.dumps(config, ensure_ascii=False, indent=2)
    (out_dir / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")
    return TokenizerFiles(vocab_size=len(ranks) + len(special_ids), special_ids=special_ids)
