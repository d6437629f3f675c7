"""Loader: bad checkpoints fail with one clear line; quantized loading works on the CPU and stays close."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_serve.config import CheckpointError
from glm_serve.loader import load_model, resolve_model_path
from glm_serve.model.simple import allocate_cache, generate_simple, single_seq_meta


@pytest.fixture
def ckpt(tiny_hf, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_hf, dst)
    return dst


def _error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        load_model(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_missing_shard(ckpt):
    victim = _shards(ckpt)[1]
    victim.unlink()
    assert victim.name in _error(ckpt)


def test_wrong_shape(ckpt):
    shard = _shards(ckpt)[0]
    tensors = load_file(str(shard))
    name = next(n for n in tensors if n.endswith("input_layernorm.weight"))
    tensors[name] = torch.ones(tensors[name].shape[0] + 1)
    save_file(tensors, str(shard))
    msg = _error(ckpt)
    assert name in msg and "shape" in msg


def test_unknown_model_type(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "model_type" in _error(ckpt) and "llama" in _error(ckpt)


def test_truncated_safetensors(ckpt):
    shard = _shards(ckpt)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    assert shard.name in _error(ckpt)


def test_missing_and_unexpected_tensors(ckpt):
    shard = _shards(ckpt)[-1]
    tensors = load_file(str(shard))
    head = tensors.pop("lm_head.weight")
    save_file(tensors, str(shard))
    assert "lm_head.weight" in _error(ckpt)
    tensors["lm_head.weight"] = head
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(shard))
    assert "model.layers.0.mlp.extra.weight" in _error(ckpt)


def test_missing_field_and_not_a_folder(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "num_hidden_layers" in _error(ckpt)
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        resolve_model_path(str(tmp_path / "nope"))


def test_offline_hub_id_names_missing_files(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as e:
        resolve_model_path("THUDM/glm-4-9b-chat")
    assert "config.json" in str(e.value) and "safetensors" in str(e.value)


def test_stale_inv_freq_is_ignored(tiny_chatglm):
    # The remote-code files carry transformer.rotary_pos_emb.inv_freq built for base 10000; it must not be used.
    model = load_model(tiny_chatglm)
    assert model.config.rope_theta == 10000.0 * 500


def test_hf_rotary_inv_freq_buffers_are_ignored(ckpt):
    # Older transformers versions saved the rotary buffers into HF-layout files; they carry nothing we use and
    # must not stop the load as unexpected tensors.
    shard = _shards(ckpt)[-1]
    tensors = load_file(str(shard))
    tensors["model.rotary_emb.inv_freq"] = torch.ones(8)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(shard))
    load_model(ckpt)


def _logits(model, ids):
    caches, nb = allocate_cache(model, len(ids), 16, torch.float32, "cpu")
    with torch.inference_mode():
        h = model(torch.tensor(ids), torch.arange(len(ids)), single_seq_meta(0, len(ids), 16, nb, "cpu"), caches)
        return model.compute_logits(h)


# Measured on tiny checkpoints (hidden 128, 2 layers, random weights, seeds 0-2), over 40 positions:
#   nf4:  relative logit error 0.141-0.153, argmax agrees with the float32 model at 65-80% of positions;
#   int8: relative logit error 0.017-0.018, argmax agrees at 95-97.5%.
# Random weights give flat logits, so argmax agreement is a pessimistic figure for real checkpoints.
@pytest.mark.parametrize("method,bound,agree", [("nf4", 0.2, 0.5), ("int8", 0.03, 0.9)])
def test_quantized_load_generates_and_stays_close(tiny_hf, method, bound, agree):
    base = load_model(tiny_hf)
    q = load_model(tiny_hf, quantization=method)
    assert not any(isinstance(m, torch.nn.Linear) and type(m) is torch.nn.Linear
                   for n, m in q.named_modules() if n.endswith(("qkv_proj", "down_proj")))
    ids = list(range(5, 45))
    ref, got = _logits(base, ids), _logits(q, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 1e-3 < rel < bound, f"{method}: relative logit error {rel:.3f}"  # > 0: really quantized
    same = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    assert same >= agree, f"{method}: argmax agrees at only {same:.0%} of positions"
    out = generate_simple(q, ids, 8)
    assert len(out) == 8


def test_int8_in_float32_logs_its_float16_cast_once_not_per_call(tiny_hf, caplog):
    caplog.set_level(logging.INFO)
    q = load_model(tiny_hf, quantization="int8")
    generate_simple(q, list(range(5, 15)), 4)
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("MatMul8bitLt") for m in messages)  # bitsandbytes: one per linear call
    assert sum("compute in float16" in m for m in messages) == 1


def test_quantization_unknown_method(tiny_hf):
    with pytest.raises(CheckpointError, match="unknown quantization"):
        load_model(tiny_hf, quantization="fp3")


def test_non_float_tensor_is_refused(ckpt):
    shard = _shards(ckpt)[-1]
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("norm.weight"))
    tensors[name] = torch.ones(tensors[name].shape, dtype=torch.bool)  # copy_ used to turn it into 1.0s
    save_file(tensors, shard, metadata={"format": "pt"})
    msg = _error(ckpt)
    assert name in msg and "bool" in msg


def test_tensor_in_two_files_is_named(tiny_chatglm, tmp_path):
    dst = tmp_path / "dup"
    shutil.copytree(tiny_chatglm, dst)
    (dst / "model.safetensors.index.json").unlink()  # a folder of files, one of them stray
    save_file({"transformer.encoder.final_layernorm.weight": torch.ones(128)}, dst / "zz-extra.safetensors")
    msg = _error(dst)
    assert "transformer.encoder.final_layernorm.weight" in msg and "zz-extra.safetensors" in msg
    assert "missing" not in msg


@pytest.mark.parametrize("edit", [
    lambda c: c.__setitem__("rms_norm_eps", None),
    lambda c: c.__setitem__("num_key_value_heads", "two"),
])
def test_config_field_of_wrong_type(ckpt, edit):
    cfg = json.loads((ckpt / "config.json").read_text())
    edit(cfg)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "config.json" in _error(ckpt)


def test_config_and_index_of_the_wrong_shape(ckpt):
    index = ckpt / "model.safetensors.index.json"
    index.write_text('{"weight_map": ["model-00001-of-00002.safetensors"]}')
    assert "weight_map" in _error(ckpt)
    (ckpt / "config.json").write_text("[1, 2]")
    assert "config.json" in _error(ckpt)


def test_hf_cache_repo_folder_resolves_to_its_snapshot(tiny_hf, tmp_path):
    repo = tmp_path / "models--THUDM--glm-4-9b-chat-hf"
    rev = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_hf, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    assert resolve_model_path(str(repo)) == repo / "snapshots" / rev
    assert resolve_model_path(str(tiny_hf)) == tiny_hf


@pytest.mark.parametrize("damage,named", [("missing", "lm_head.weight"), ("shape", "lm_head.weight"),
                                          ("extra", "mlp.up_proj.weight")])
def test_bad_tensors_are_named_before_any_data_is_read(ckpt, monkeypatch, damage, named):
    # A 9B checkpoint streams for minutes: its header already says what is missing, extra or misshapen.
    shard = _shards(ckpt)[-1]
    tensors = load_file(shard)
    if damage == "missing":
        del tensors["lm_head.weight"]
    elif damage == "shape":
        tensors["lm_head.weight"] = tensors["lm_head.weight"][:-1].clone()
    else:
        tensors["model.layers.0.mlp.up_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, shard, metadata={"format": "pt"})

    def read_data(path):
        raise AssertionError(f"tensor data of {path.name} read before the checkpoint was checked")

    monkeypatch.setattr("glm_serve.loader._iter_tensors", read_data)
    assert named in _error(ckpt)


def test_missing_vision_tensor_is_named_before_any_data_is_read(tmp_path, monkeypatch):
    from glm_serve.tiny_vision import TinyVisionSpec, make_tiny_vision

    path = make_tiny_vision(tmp_path / "v", spec=TinyVisionSpec(seed=0))
    for shard in path.glob("*.safetensors"):
        tensors = load_file(shard)
        name = next((n for n in tensors if n.startswith("transformer.vision.")), None)
        if name:
            del tensors[name]
            save_file(tensors, shard, metadata={"format": "pt"})
            break
    monkeypatch.setattr("glm_serve.loader._iter_tensors", lambda p: (_ for _ in ()).throw(AssertionError("read")))
    assert name in _error(path)


def test_pre_quantized_checkpoint_is_refused_by_its_config(ckpt):
    # AWQ/GPTQ/bitsandbytes exports: their int tensors used to surface as one "unexpected tensor" after another.
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "awq", "bits": 4}}))
    msg = _error(ckpt)
    assert "pre-quantized" in msg and "awq" in msg and "--quantization" in msg


def test_a_missing_folder_is_not_called_a_hub_miss(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # "data/glm-4-9b-chat" is a mistyped relative folder as often as it is a hub id: say both.
    with pytest.raises(CheckpointError, match="no such local folder, and as a hub id not in the local HF cache"):
        resolve_model_path("data/glm-4-9b-chat")
    a_file = tmp_path / "config.json"
    a_file.write_text("{}")
    with pytest.raises(CheckpointError, match=r"not a checkpoint folder \(a file"):
        resolve_model_path(str(a_file))


@pytest.mark.parametrize("capability,auto", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)])
def test_dtype_follows_what_the_gpu_computes(monkeypatch, capability, auto):
    # Before: auto was bfloat16 on every GPU, and --dtype bfloat16 was taken on a V100/T4 too, where bf16 is only
    # emulated and the Triton kernels do not compile for it (a failure at warm-up, after the whole load).
    from glm_serve.loader import parse_dtype

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert parse_dtype("auto", "cuda") == auto
    assert parse_dtype("float16", "cuda:0") == torch.float16
    if auto == torch.bfloat16:
        assert parse_dtype("bfloat16", "cuda") == torch.bfloat16
    else:
        with pytest.raises(ValueError, match="sm_75.*--dtype float16"):
            parse_dtype("bfloat16", "cuda")
    assert parse_dtype("auto", "cpu") == torch.float32


@pytest.mark.parametrize("value,offline", [("1", True), ("true", True), ("ON", True), ("False", False),
                                           ("no", False), ("0", False), ("", False)])
def test_hf_hub_offline_is_read_as_huggingface_hub_reads_it(monkeypatch, tmp_path, value, offline):
    # Before: anything but "0", "" or "false" meant offline, so HF_HUB_OFFLINE=False (or no, off) never downloaded.
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, allow_patterns, local_files_only):
        calls.append(local_files_only)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert resolve_model_path("THUDM/glm-4-9b-chat") == tmp_path
    assert calls == [offline]


@pytest.mark.parametrize("scaling", [{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
                                     {"rope_type": "yarn", "factor": 4.0}])
def test_rope_scaling_in_either_spelling_is_refused(tiny_glm4, tmp_path, scaling):
    # GLM-4-0414's model card tells users to add {"type": "yarn", ...} for long inputs; only "rope_type" was read,
    # so the YaRN frequencies were silently dropped (logits unlike transformers' at every length).
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_glm4, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "rope_scaling": scaling}))
    assert "rope_type 'yarn' is not supported" in _error(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**cfg, "rope_scaling": "yarn"}))
    assert "rope_scaling must be" in _error(ckpt)


@pytest.mark.parametrize("key,layout", [("rms_norm_eps", "tiny_hf"), ("layernorm_epsilon", "tiny_chatglm")])
@pytest.mark.parametrize("value", [0, -1e-5, float("nan")])
def test_a_norm_epsilon_that_makes_nan_is_refused(request, tmp_path, key, layout, value):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(request.getfixturevalue(layout), ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, key: value}))
    assert "RMSNorm epsilon must be > 0" in _error(ckpt)


def test_config_json_not_utf8_names_the_file(ckpt):
    (ckpt / "config.json").write_bytes(b"\xff\xfe{}")  # e.g. saved as UTF-16 by an editor
    assert "config.json: not valid JSON" in _error(ckpt)


def test_unreadable_files_are_one_line(ckpt, tiny_chatglm, tmp_path, monkeypatch):
    # A model folder mounted into a container with the wrong owner: PermissionError tracebacks before. (chmod does
    # not stop root, which CI may be, so the read itself is made to fail.)
    from pathlib import Path

    from glm_serve.tokenizer import load_tokenizer

    read_text = Path.read_text

    def denied(self, *a, **kw):
        if self.name in ("config.json", "tokenizer_config.json", "tokenizer.model"):
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", denied)
    assert "config.json: cannot read it (Permission denied)" in _error(ckpt)
    for folder, name in ((ckpt, "tokenizer_config.json"), (tiny_chatglm, "tokenizer_config.json")):
        with pytest.raises(ValueError, match=f"{name}: cannot read it"):
            load_tokenizer(folder)
    chatglm = tmp_path / "cg"
    shutil.copytree(tiny_chatglm, chatglm)
    (chatglm / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="tokenizer.model: cannot read it"):
        load_tokenizer(chatglm)


def test_non_float_vision_tensor_is_refused(tmp_path):
    from glm_serve.tiny_vision import TinyVisionSpec, make_tiny_vision

    path = make_tiny_vision(tmp_path / "v", spec=TinyVisionSpec(seed=0))
    shards = {f: load_file(f) for f in path.glob("*.safetensors")}
    shard, name = next((f, n) for f, ts in shards.items() for n in ts
                       if n.startswith("transformer.vision.") and n.endswith("weight"))
    tensors = shards[shard]
    tensors[name] = tensors[name].to(torch.int8)  # the LM's tensors were checked; the tower's were cast silently
    save_file(tensors, shard, metadata={"format": "pt"})
    msg = _error(path)
    assert name in msg and "int8" in msg
