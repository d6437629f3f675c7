"""GLM-4 tokenizer: loads `tokenizer.json` (HF tokenizers) or `tokenizer.model` (tiktoken ranks), plus streaming
detokenization that never splits a UTF-8 character.

Both back-ends only split ordinary text into BPE ids; special tokens, decoding and stop ids are handled here the
same way for both, from the ids the checkpoint's own files give (never hard-coded: tiny test tokenizers put the
14 specials right after a ~2,000-token vocab, the real one after 151,329 tokens).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import re
from dataclasses import dataclass
from pathlib import Path

# The pre-tokenizer split (cl100k's), used by the vendor's tiktoken tokenizer and the -hf tokenizer.json.
GLM4_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Order of the special tokens right after the regular vocabulary (glm4.md); ids come from the files.
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
    "<|end_of_video|>",
)
# Generation must stop on all three: forgetting the last two is the classic "never stops" GLM-4 bug.
STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to code points from 256 up, so
    every byte string has a whitespace-free, reversible text form (that is how tokenizer.json stores tokens)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def token_bytes_to_str(token: bytes) -> str:
    return "".join(_BYTE_TO_CHAR[b] for b in token)


def token_str_to_bytes(text: str, where: str) -> bytes:
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        raise ValueError(f"{where}: token {text!r} is not byte-level BPE (GLM-4 tokenizers are)") from None


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """`base64(token bytes) rank` per line, like the vendor's tokenizer.model."""
    ranks: dict[bytes, int] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:  # ChatGLM2/ChatGLM3 (model_type chatglm too) ship a binary sentencepiece model here
        raise ValueError(f"{path}: not a tiktoken rank file (a binary file: the sentencepiece model of ChatGLM2/3? "
                         "glm-serve serves GLM-4 checkpoints)") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ValueError(f"{path}:{lineno}: expected 'base64 rank', got {line[:80]!r}")
        try:
            ranks[base64.b64decode(parts[0])] = int(parts[1])  # as the vendor reads it (no validate=)
        except binascii.Error as e:
            raise ValueError(f"{path}:{lineno}: {parts[0][:40]!r} is not base64 ({e})") from None
    return ranks


class _TiktokenBackend:
    def __init__(self, ranks: dict[bytes, int]):
        import tiktoken  # noqa: PLC0415 (only this back-end needs it)

        self._enc = tiktoken.Encoding(name="glm4", pat_str=GLM4_SPLIT_PATTERN, mergeable_ranks=ranks,
                                      special_tokens={})

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)


class _HfBackend:
    def __init__(self, spec: dict):
        from tokenizers import Tokenizer  # noqa: PLC0415

        # Added tokens and the post-processor are ours to handle: the back-end only splits ordinary text, so
        # "<|user|>" typed by a user stays text when allow_special=False.
        spec = {**spec, "added_tokens": [], "post_processor": None}
        self._tok = Tokenizer.from_str(json.dumps(spec))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


@dataclass(frozen=True)
class AddedToken:
    text: str
    id: int
    special: bool  # special tokens are matched in text only when allow_special; others always


class GlmTokenizer:
    """Encode/decode for one checkpoint. Build with `load_tokenizer(model_dir)`."""

    def __init__(self, backend, regular: dict[int, bytes], added: list[AddedToken], stop_token_ids: list[int],
                 chat_template: str | None, source: str):
        self._backend = backend
        self.source = source  # "tokenizer.json" or "tokenizer.model"
        self.vocab_size = max([*regular, *(t.id for t in added)]) + 1  # regular + added; the model pads beyond
        self._bytes: list[bytes] = [b""] * self.vocab_size  # id -> token bytes (specials: their text)
        self._is_special = [False] * self.vocab_size
        for i, b in regular.items():
            self._bytes[i] = b
        for t in added:
            self._bytes[t.id] = t.text.encode("utf-8")
            self._is_special[t.id] = t.special
        self._bytes_to_id = {b: i for i, b in regular.items()}
        self.special_ids: dict[str, int] = {t.text: t.id for t in added}
        self._added = added
        self.stop_token_ids = stop_token_ids
        self.chat_template = chat_template
        by_length = sorted(added, key=lambda t: -len(t.text))
        self._split_all = self._splitter(by_length)
        self._split_plain = self._splitter([t for t in by_length if not t.special])
        self._texts: dict[bool, list[str | None]] = {}  # skip_special -> per-id text (see token_texts)

    def token_texts(self, skip_special: bool) -> list[str | None]:
        """[vocab_size] the text of each token id on its own, or None where its bytes are not complete UTF-8
        (part of a character). Built once per tokenizer: the detokenizer's per-token fast path."""
        texts = self._texts.get(skip_special)
        if texts is None:
            texts = self._texts[skip_special] = [_utf8_or_none(self._piece(i, skip_special))
                                                 for i in range(self.vocab_size)]
        return texts

    @staticmethod
    def _splitter(tokens: list[AddedToken]) -> re.Pattern | None:
        return re.compile("(" + "|".join(re.escape(t.text) for t in tokens) + ")") if tokens else None

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Ids of `text`; with allow_special, special-token text such as "<|user|>" becomes its single id."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a str, got {type(text).__name__}")
        splitter = self._split_all if allow_special else self._split_plain
        if splitter is None:
            return self._backend.encode(text)
        ids: list[int] = []
        for k, piece in enumerate(splitter.split(text)):
            if k % 2:  # odd pieces are the captured added-token texts
                ids.append(self.special_ids[piece])
            elif piece:
                ids.extend(self._backend.encode(piece))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 becomes U+FFFD. Ids past the tokenizer (padded rows) decode to ""."""
        return b"".join(self._piece(i, skip_special_tokens) for i in ids).decode("utf-8", errors="replace")

    def _piece(self, token_id: int, skip_special: bool) -> bytes:
        if token_id < 0:
            raise ValueError(f"token id must be >= 0, got {token_id}")
        if token_id >= self.vocab_size or (skip_special and self._is_special[token_id]):
            return b""
        return self._bytes[token_id]

    def id_to_token_bytes(self, token_id: int) -> bytes:
        return self._piece(token_id, False)

    def is_special(self, token_id: int) -> bool:
        return 0 <= token_id < self.vocab_size and self._is_special[token_id]

    def token_to_id(self, token: str) -> int | None:
        """Id of a special token's text, or of text that is exactly one regular token; None otherwise."""
        if token in self.special_ids:
            return self.special_ids[token]
        return self._bytes_to_id.get(token.encode("utf-8"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:  # e.g. a mounted model folder the server's user may not read
        raise ValueError(f"{path}: cannot read it ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _chat_template(model_dir: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja = model_dir / "chat_template.jinja"  # where newer transformers save it
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _stop_ids(model_dir: Path, special_ids: dict[str, int]) -> list[int]:
    ids: list[int] = []
    # As transformers: generation_config.json's eos ids, or config.json's when the checkpoint has no such file.
    path = model_dir / "generation_config.json"
    if not path.is_file():
        path = model_dir / "config.json"
    if path.is_file():
        eos = _read_json(path).get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    for name in STOP_TOKENS:
        if name not in special_ids:
            raise ValueError(f"{model_dir}: the tokenizer files define no {name} token")
        if special_ids[name] not in ids:
            ids.append(special_ids[name])
    return ids


def _added_from_config(config: dict, where: Path) -> list[AddedToken]:
    added = []
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if not (str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str)):
            raise ValueError(f"{where}: bad added_tokens_decoder entry {key!r}")
        added.append(AddedToken(entry["content"], int(key), bool(entry.get("special", True))))
    return added


def read_chat_template(path: str | Path) -> str:
    """A chat template file (`--chat-template`, `LLM(chat_template=...)`): jinja, as a checkpoint's own, checked
    here (it compiles) so that a mistake is a start-up error rather than every request's 500."""
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--chat-template: {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template: cannot read {path} ({e})") from None
    if not text.strip():
        raise ValueError(f"--chat-template: {path} is empty")
    from jinja2 import TemplateError  # noqa: PLC0415

    from glm_serve.chat import _compile  # noqa: PLC0415 (chat imports this module)

    try:
        _compile(text)
    except TemplateError as e:
        raise ValueError(f"--chat-template: {path} is not a valid jinja template ({e})") from None
    return text


def load_tokenizer(model_dir: str | Path, backend: str = "auto", chat_template: str | Path | None = None
                   ) -> GlmTokenizer:
    """Tokenizer of a checkpoint folder. backend: "auto" (tokenizer.json when present, else tokenizer.model),
    "hf" or "tiktoken". chat_template: a template file that replaces the checkpoint's (read_chat_template)."""
    if chat_template is not None:
        template = read_chat_template(chat_template)
        tok = load_tokenizer(model_dir, backend)
        tok.chat_template = template
        return tok
    model_dir = Path(model_dir)
    if backend not in ("auto", "hf", "tiktoken"):
        raise ValueError(f"backend must be auto, hf or tiktoken, got {backend!r}")
    cfg_path = model_dir / "tokenizer_config.json"
    config = _read_json(cfg_path) if cfg_path.is_file() else {}
    json_path, model_path = model_dir / "tokenizer.json", model_dir / "tokenizer.model"
    use_hf = backend == "hf" or (backend == "auto" and json_path.is_file())
    if use_hf:
        if not json_path.is_file():
            raise ValueError(f"{model_dir}: no tokenizer.json")
        spec = _read_json(json_path)
        model = spec.get("model") or {}
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
            raise ValueError(f"{json_path}: expected a BPE model with a vocab")
        regular = {int(i): token_str_to_bytes(s, str(json_path)) for s, i in model["vocab"].items()}
        added = []
        for t in spec.get("added_tokens") or []:
            if not (isinstance(t, dict) and isinstance(t.get("content"), str) and isinstance(t.get("id"), int)):
                raise ValueError(f"{json_path}: bad added_tokens entry {str(t)[:80]} (needs a string content and an "
                                 "integer id)")
            added.append(AddedToken(t["content"], t["id"], bool(t.get("special", True))))
        added = added or _added_from_config(config, cfg_path)
        for t in added:  # some files also list the added tokens in the model vocab: they are not text bytes
            regular.pop(t.id, None)
        back, source = _HfBackend(spec), "tokenizer.json"
    else:
        if not model_path.is_file():
            raise ValueError(f"{model_dir}: no tokenizer.model (and no tokenizer.json)")
        ranks = read_tiktoken_ranks(model_path)
        regular = {i: b for b, i in ranks.items()}
        added = _added_from_config(config, cfg_path)
        if not added:  # no config: the specials follow the regular ranks in the known order
            start = max(regular) + 1
            added = [AddedToken(name, start + k, True) for k, name in enumerate(GLM4_SPECIAL_TOKENS)]
        back, source = _TiktokenBackend(ranks), "tokenizer.model"
    special_ids = {t.text: t.id for t in added}
    return GlmTokenizer(back, regular, added, _stop_ids(model_dir, special_ids), _chat_template(model_dir, config),
                        source)


def _utf8_or_none(b: bytes) -> str | None:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        return None


class IncrementalDetokenizer:
    """Turns generated ids into text deltas, one token at a time, without ever emitting half a character.

    Bytes go through Python's incremental UTF-8 decoder: it holds back an incomplete trailing sequence until
    the next token completes it, and replaces invalid bytes exactly as a one-shot decode does, so the deltas
    (plus `flush()`) concatenate to `tokenizer.decode(ids)`. O(token length) per step, no re-decoding.

    prompt_ids: when the prompt ends inside a character (a raw-id prompt can), the output's first bytes
    complete it and the delta includes that character; only the prompt's last few bytes are looked at.
    """

    def __init__(self, tokenizer: GlmTokenizer, prompt_ids=None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        tail, k = b"", len(prompt_ids) if prompt_ids is not None else 0
        while k > 0 and len(tail) < 4:  # a pending sequence is at most 3 bytes; 4 reach a character start
            k -= 1
            tail = tokenizer._piece(int(prompt_ids[k]), skip_special_tokens) + tail
        self._decoder.decode(tail)  # the prompt's own text is not output; only its pending bytes are kept
        self._texts = tokenizer.token_texts(skip_special_tokens)
        self._clean = not self._decoder.buffer  # no bytes pending in the decoder

    def add(self, token_id: int) -> str:
        # Fast path (one list read per generated token): no bytes pending and the token is whole characters, so
        # the decoder would return exactly its text and stay empty. Ids past the table go the slow way.
        if self._clean and token_id >= 0:
            try:
                text = self._texts[token_id]
            except IndexError:
                text = None
            if text is not None:
                return text
        text = self._decoder.decode(self.tokenizer._piece(token_id, self.skip_special_tokens))
        self._clean = not self._decoder.buffer
        return text

    def flush(self) -> str:
        """At the end of the stream: bytes still pending (an unfinished character) become U+FFFD."""
        text = self._decoder.decode(b"", final=True)
        self._clean = True
        return text
