"""The command line: make-tiny writes real-format checkpoints; generate answers a prompt or a messages file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from glm_serve.cli import main
from glm_serve.config import load_config
from glm_serve.llm import LLM
from glm_serve.sampling_params import SamplingParams


def test_make_tiny_layouts(tmp_path):
    hf, cg = tmp_path / "hf", tmp_path / "cg"
    assert main(["make-tiny", str(hf), "--layout", "hf", "--shards", "3", "--kv-heads", "4", "--heads", "8"]) == 0
    assert main(["make-tiny", str(cg), "--layout", "chatglm", "--rope-ratio", "10000", "--kv-heads", "4",
                 "--max-position", "1048576"]) == 0  # glm-4-9b-chat-1m's config, tiny
    assert len(list(hf.glob("model-0000?-of-00003.safetensors"))) == 3
    assert (hf / "model.safetensors.index.json").is_file() and (hf / "tokenizer.json").is_file()
    assert (cg / "tokenizer.model").is_file() and (cg / "model.safetensors").is_file()
    assert load_config(hf).num_kv_heads == 4
    cfg = load_config(cg)
    assert cfg.model_type == "chatglm" and cfg.rope_theta == 10000.0 * 10000
    assert cfg.max_position == 1048576 and cfg.num_kv_heads == 4 and load_config(hf).max_position == 131072
    gen = json.loads((hf / "generation_config.json").read_text())
    assert len(gen["eos_token_id"]) == 3
    assert "chat_template" in json.loads((hf / "tokenizer_config.json").read_text())


def test_make_tiny_rejects_bad_options(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "x"), "--kv-heads", "3"]) == 2
    assert "kv-heads" in capsys.readouterr().err
    assert main(["make-tiny", str(tmp_path / "v"), "--vision", "--layers", "4", "--hidden", "64"]) == 2
    err = capsys.readouterr().err
    assert "--layers" in err and "--hidden" in err and "Traceback" not in err
    assert not (tmp_path / "v").exists()
    assert main(["make-tiny", str(tmp_path / "p"), "--max-position", "1"]) == 2
    assert "--max-position must be >= 2" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_make_tiny_on_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["make-tiny", str(tmp_path / "x"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err


def test_generate_prompt_matches_engine(tiny_hf, capsys):
    assert main(["generate", "--model", str(tiny_hf), "--prompt", "你好", "--max-tokens", "24", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    llm = LLM(str(tiny_hf), kv_cache_tokens=1024)
    res = llm.generate([[{"role": "user", "content": "你好"}]], SamplingParams(temperature=0, max_tokens=24),
                       use_tqdm=False)[0]
    assert printed == res.text.removeprefix("\n") + "\n"


def test_generate_messages_file(tiny_chatglm, tmp_path, capsys):
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "What is 2+2?"}]}))
    assert main(["generate", "--model", str(tiny_chatglm), "--messages", str(msgs), "--max-tokens", "8"]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_generate_bad_model_is_one_line(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("glm-serve: error:") and "\n" not in err


def test_preset_has_the_real_glm4_9b_shapes():
    from glm_serve.config import ModelConfig
    from glm_serve.tiny import TinySpec, _config_json, _our_shapes

    for layout in ("hf", "chatglm"):
        cfg = ModelConfig.from_dict(_config_json(TinySpec(layout=layout, preset="glm-4-9b"), 151552, [1, 2, 3]))
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4096, 40, 32, 2, 128)
        assert cfg.intermediate_size == 13696 and cfg.vocab_size == 151552
        assert cfg.kv_bytes_per_token(2) == 40 * 1024  # 40 KiB per token in bf16 (glm4.md)
        params = sum(math.prod(shape) for _, shape in _our_shapes(cfg))
        assert abs(params / 1e9 - 9.40) < 0.01  # 9.40 B parameters


def test_make_tiny_vision(tmp_path):
    out = tmp_path / "v"
    assert main(["make-tiny", str(out), "--vision", "--seed", "2"]) == 0
    cfg = load_config(out)
    assert cfg.model_type == "chatglm" and cfg.vision["image_size"] == 56


def test_generate_bad_messages_file_is_one_line(tiny_hf, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"msgs": []}')
    for path in (bad, tmp_path / "missing.json"):
        assert main(["generate", "--model", str(tiny_hf), "--messages", str(path), "--max-tokens", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("glm-serve: error: --messages") and err.count("\n") == 1


def test_llm_generate_parses_only_the_requests_tools(tiny_hf, monkeypatch):
    import glm_serve.chat as chat

    seen = []
    real = chat.parse_assistant_output
    monkeypatch.setattr(chat, "parse_assistant_output",
                        lambda text, names=None: seen.append(names) or real(text, names))
    llm = LLM(str(tiny_hf), kv_cache_tokens=1024)
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    conv = [{"role": "user", "content": "hi"}]
    llm.generate(conv, SamplingParams(temperature=0, max_tokens=2), tools=[tool], use_tqdm=False)
    llm.generate(conv, SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert seen == [frozenset({"get_weather"}), frozenset()]
    # what that means for a text shaped like a call: a call only of a function the request offered
    assert real('Note:\n{"a": 1}', frozenset()).tool_calls == []
    assert real('get_weather\n{"a": 1}', frozenset({"get_weather"})).tool_calls[0].name == "get_weather"
