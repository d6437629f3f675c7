"""Tokenizer tests: tiny tokenizer files in both layouts, both back-ends against a reference BPE and transformers,
special/stop ids, decoding, and the incremental detokenizer."""

import base64
import json
import random

import pytest
import regex

from glm_serve.chat import GLM4_CHAT_TEMPLATE
from glm_serve.tiny_tokenizer import NUM_REGULAR, write_tokenizer_files
from glm_serve.tokenizer import GLM4_SPECIAL_TOKENS, GLM4_SPLIT_PATTERN, IncrementalDetokenizer, load_tokenizer

SEED = random.randrange(2**32)  # fresh inputs each run; printed in failures

PIECES = [
    *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789",
    *" .,;:'\"!?()[]{}<>|/\\-_=+*&^%$#@~`",
    *"的一是了我不人在他有这个上们来到时大地为子中你说生国年着就那和要她出也得里后自以会家可下而过天去能对小多然于心学",
    *"，。！？、：；（）【】《》“”",
    "😀", "🎉", "👍", "❤️", "🚀", "🌧️", "👨‍👩‍👧", "é", "e\u0301", "ß", "Ω", "ж", "ア", "한", "\u00a0", "\u3000",
    " ", " ", "  ", "   ", "    ", "\t", "\n", "\n\n", "\r\n", " \n ", "'s", "'LL", "'ve", "n't",
    "12", "345", "6789", "3.14", "1e-6", "def ", "return ", "self.", "print(", "[i]", "{}", "->", "==", "    if ",
    "hello", " world", "the", " weather", "北京", "天气", "你好", "人工智能",
]
SPECIAL_TEXT = ["<|user|>", "<|assistant|>", "<|system|>", "[gMASK]", "<sop>", "<|observation|>", "<|endoftext|>"]


def random_text(rng: random.Random, max_pieces: int = 40, specials: bool = False) -> str:
    pool = PIECES + SPECIAL_TEXT if specials else PIECES
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, max_pieces)))


FIXED_TEXTS = [
    "", "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\r\n\n", " " * 17, "\n" * 5 + " " * 3,
    "北京今天天气晴朗，最高气温二十五度。", "你好👋，我是 GLM-4！🎉🚀", "e\u0301te\u0301 ça", "1234567890 3.14159 1e-6 -42",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n", "I'm we'LL they've IT'S", "😀" * 7, "\u3000全角空格\u3000",
    "emoji zwj: 👨‍👩‍👧 flags: 🇨🇳🇫🇷", "mixed中文and English混合text123数字",
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    files = {layout: write_tokenizer_files(root / layout, layout) for layout in ("hf", "chatglm")}
    return root, files


@pytest.fixture(scope="module")
def toks(dirs):
    root, _ = dirs
    return load_tokenizer(root / "hf"), load_tokenizer(root / "chatglm")


def reference_bpe(ranks: dict[bytes, int], text: str) -> list[int]:
    """Slow textbook version of tiktoken's rule: split with the GLM-4 regex; a piece that is a token is taken
    whole; else repeatedly merge the adjacent pair whose bytes have the lowest rank (leftmost on ties)."""
    out = []
    for piece in regex.findall(GLM4_SPLIT_PATTERN, text):
        data = piece.encode("utf-8")
        if data in ranks:
            out.append(ranks[data])
            continue
        parts = [bytes([b]) for b in data]
        while True:
            best = None
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out.extend(ranks[p] for p in parts)
    return out


def read_ranks(path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split(" ")
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def test_files_have_the_real_layouts(dirs):
    root, files = dirs
    assert sorted(p.name for p in (root / "hf").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in (root / "chatglm").iterdir()) == ["tokenizer.model", "tokenizer_config.json"]
    ranks = read_ranks(root / "chatglm" / "tokenizer.model")
    assert sorted(ranks.values()) == list(range(NUM_REGULAR))
    assert all(ranks[bytes([b])] == b for b in range(256))  # every byte is a token: any input encodes
    assert any(len(t.decode("utf-8", "ignore")) == 1 and len(t) == 3 for t in ranks)  # Chinese characters merged
    cg = json.loads((root / "chatglm" / "tokenizer_config.json").read_text())
    assert cg["auto_map"]["AutoTokenizer"][0] == "tokenization_chatglm.ChatGLM4Tokenizer"
    assert cg["tokenizer_class"] == "ChatGLM4Tokenizer" and cg["eos_token"] == "<|endoftext|>"
    hf = json.loads((root / "hf" / "tokenizer_config.json").read_text())
    assert hf["tokenizer_class"] == "PreTrainedTokenizerFast" and hf["model_max_length"] == 131072
    for cfg, f in ((cg, files["chatglm"]), (hf, files["hf"])):
        assert cfg["chat_template"] == GLM4_CHAT_TEMPLATE
        assert {e["content"]: int(i) for i, e in cfg["added_tokens_decoder"].items()} == f.special_ids
    spec = json.loads((root / "hf" / "tokenizer.json").read_text())
    assert [t["content"] for t in spec["added_tokens"]] == list(GLM4_SPECIAL_TOKENS)
    assert spec["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == GLM4_SPLIT_PATTERN


def test_files_are_deterministic(dirs, tmp_path):
    root, _ = dirs
    for layout in ("hf", "chatglm"):
        write_tokenizer_files(tmp_path / layout, layout)
        for p in (root / layout).iterdir():
            assert (tmp_path / layout / p.name).read_bytes() == p.read_bytes(), p.name


def test_special_ids_follow_the_regular_vocab_in_order(dirs, toks):
    _, files = dirs
    for f in files.values():
        assert f.vocab_size == NUM_REGULAR + 14
        assert list(f.special_ids) == list(GLM4_SPECIAL_TOKENS)
        assert list(f.special_ids.values()) == list(range(NUM_REGULAR, NUM_REGULAR + 14))
    for tok in toks:
        assert tok.special_ids == files["hf"].special_ids and tok.vocab_size == NUM_REGULAR + 14
        assert set(tok.stop_token_ids) == {tok.special_ids[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
        assert tok.chat_template == GLM4_CHAT_TEMPLATE
        assert tok.is_special(tok.special_ids["<|user|>"]) and not tok.is_special(5)


def test_specials_without_config_follow_ranks_in_known_order(dirs, tmp_path):
    root, _ = dirs
    (tmp_path / "tokenizer.model").write_bytes((root / "chatglm" / "tokenizer.model").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert tok.special_ids == {t: NUM_REGULAR + k for k, t in enumerate(GLM4_SPECIAL_TOKENS)}
    assert tok.chat_template is None


def test_stop_ids_include_generation_config(dirs, tmp_path):
    root, _ = dirs
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((root / "hf" / name).read_bytes())
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, NUM_REGULAR]}))
    tok = load_tokenizer(tmp_path)
    assert tok.stop_token_ids[:2] == [7, NUM_REGULAR]
    assert set(tok.stop_token_ids) == {7, NUM_REGULAR, NUM_REGULAR + 7, NUM_REGULAR + 9}


def test_both_backends_match_reference_bpe(dirs, toks):
    root, _ = dirs
    ranks = read_ranks(root / "chatglm" / "tokenizer.model")
    rng = random.Random(SEED)
    texts = FIXED_TEXTS + [random_text(rng) for _ in range(400)]
    for text in texts:
        want = reference_bpe(ranks, text)
        for tok in toks:
            assert tok.encode(text, allow_special=False) == want, (SEED, tok.source, text)


def test_backends_agree_with_each_other_and_transformers(dirs, toks):
    from transformers import AutoTokenizer

    root, _ = dirs
    oracle = AutoTokenizer.from_pretrained(str(root / "hf"))
    hf, cg = toks
    rng = random.Random(SEED + 1)
    texts = FIXED_TEXTS + [random_text(rng, 80, specials=True) for _ in range(1500)]
    texts += ["".join(rng.choice([" ", "  ", "\n", "\t", "x", "ab", "中"]) for _ in range(50)) for _ in range(300)]
    for text in texts:
        ids = hf.encode(text)
        assert ids == cg.encode(text), (SEED, text)
        assert ids == oracle.encode(text, add_special_tokens=False), (SEED, text)
        assert hf.decode(ids) == cg.decode(ids) == text


def test_encode_special_text(toks):
    for tok in toks:
        user = tok.special_ids["<|user|>"]
        assert tok.encode("a<|user|>b") == tok.encode("a") + [user] + tok.encode("b")
        plain = tok.encode("a<|user|>b", allow_special=False)
        assert user not in plain and not any(tok.is_special(i) for i in plain)
        assert tok.decode(plain) == "a<|user|>b"
        assert tok.decode([user, *tok.encode("hi")], skip_special_tokens=True) == "hi"
        assert tok.token_to_id("<|user|>") == user and tok.token_to_id("a") == ord("a")
        assert tok.token_to_id("not a single token at all") is None


def test_decode_bytes_and_out_of_range_ids(toks):
    rng = random.Random(SEED + 2)
    for tok in toks:
        assert [tok.id_to_token_bytes(i) for i in range(256)] == [bytes([i]) for i in range(256)]
        assert tok.id_to_token_bytes(tok.special_ids["<sop>"]) == b"<sop>"
        for _ in range(200):
            ids = [rng.randrange(tok.vocab_size + 50) for _ in range(rng.randint(0, 30))]
            want = b"".join(tok.id_to_token_bytes(i) if i < tok.vocab_size else b"" for i in ids)
            assert tok.decode(ids) == want.decode("utf-8", "replace"), (SEED, ids)
        assert tok.decode([tok.vocab_size, tok.vocab_size + 1000]) == ""
        with pytest.raises(ValueError):
            tok.decode([-1])


def test_incremental_detokenizer_streams_whole_characters(toks):
    rng = random.Random(SEED + 3)
    texts = FIXED_TEXTS + [random_text(rng, 60) for _ in range(100)]
    for tok in toks:
        for text in texts:
            ids = tok.encode(text)
            detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
            deltas = [detok.add(i) for i in ids]
            assert all("\ufffd" not in d for d in deltas), (SEED, text, deltas)
            assert "".join(deltas) + detok.flush() == tok.decode(ids) == text


def test_incremental_detokenizer_matches_decode_on_any_ids(toks):
    rng = random.Random(SEED + 4)
    tok = toks[0]
    for _ in range(300):
        ids = [rng.choice([rng.randrange(256), rng.randrange(tok.vocab_size + 10)]) for _ in range(rng.randint(0, 40))]
        for skip in (False, True):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            got = "".join(detok.add(i) for i in ids) + detok.flush()
            assert got == tok.decode(ids, skip_special_tokens=skip), (SEED, ids)


def test_incremental_detokenizer_completes_a_character_begun_in_the_prompt(toks):
    tok = toks[1]
    b = "你".encode("utf-8")
    prompt = tok.encode("hi ") + [b[0]]  # ids of single bytes are the byte values
    detok = IncrementalDetokenizer(tok, prompt_ids=prompt)
    assert detok.add(b[1]) == ""
    assert detok.add(b[2]) == "你"
    assert "".join(detok.add(i) for i in tok.encode("好!")) == "好!"


def test_stop_ids_fall_back_to_config_json_without_generation_config(dirs, tmp_path):
    # transformers derives the generation config from config.json when a checkpoint ships none; its eos ids
    # (a fine-tune's own end token, say) were ignored here, so generation ran past them.
    root, _ = dirs
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((root / "hf" / name).read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm", "eos_token_id": [5, NUM_REGULAR]}))
    assert load_tokenizer(tmp_path).stop_token_ids[:2] == [5, NUM_REGULAR]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))  # it wins, as in transformers
    assert 5 not in load_tokenizer(tmp_path).stop_token_ids


def _copy(root, layout, dst, *names):
    for name in names:
        (dst / name).write_bytes((root / layout / name).read_bytes())


def test_damaged_tokenizer_files_are_one_line_naming_the_file(dirs, tmp_path):
    # Before: a sentencepiece tokenizer.model (ChatGLM2/3, model_type chatglm too) was "'utf-8' codec can't
    # decode byte 0x80", a bad base64 line "Incorrect padding", an added token without an id a KeyError traceback.
    root, _ = dirs
    (tmp_path / "tokenizer.model").write_bytes(b"\x80\x81\x00\x0a\x0bsentencepiece")
    with pytest.raises(ValueError, match=r"tokenizer.model: not a tiktoken rank file .*sentencepiece"):
        load_tokenizer(tmp_path)
    lines = (root / "chatglm" / "tokenizer.model").read_text().splitlines()
    (tmp_path / "tokenizer.model").write_text("\n".join([*lines[:5], "abc 5", *lines[6:]]))
    with pytest.raises(ValueError, match=r"tokenizer.model:6: 'abc' is not base64"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    _copy(root, "hf", tmp_path, "tokenizer_config.json")
    spec = json.loads((root / "hf" / "tokenizer.json").read_text())
    spec["added_tokens"].append({"content": "<x>"})
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=r"tokenizer.json: bad added_tokens entry"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ValueError, match=r"tokenizer_config.json: not valid JSON"):
        load_tokenizer(tmp_path)
