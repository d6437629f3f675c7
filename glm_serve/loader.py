"""Loader: find a checkpoint (folder or hub id), build the model without materialising it, and stream the
safetensors in tensor by tensor onto the target device and dtype (optionally quantizing as it goes).

Peak host memory stays at about one tensor: files are memory-mapped, each tensor is converted and copied to
its place, then dropped. Every failure (missing shard, unknown tensor, wrong shape, truncated file) raises one
CheckpointError whose message names the file or tensor; all but a truncated file are found by a dry run over
the files' headers before any weight is read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open

from glm_serve.config import CheckpointError, ModelConfig, load_config
from glm_serve.model.attention import AttentionBackend
from glm_serve.model.glm import GlmForCausalLM
from glm_serve.model.vision import is_vision_name
from glm_serve.quant import QUANT_METHODS, QuantizedLoader
from glm_serve.weights import map_name

log = logging.getLogger(__name__)

# Files a checkpoint folder needs besides the weights; used to fetch from the hub and to explain what is missing.
_META_PATTERNS = ["*.json", "tokenizer.model", "*.jinja", "*.txt"]


def resolve_model_path(model: str) -> Path:
    """A local folder as is; otherwise a hub id (`THUDM/glm-4-9b-chat-hf`) through the HF cache, downloading
    when online. Offline and not cached -> a CheckpointError that says which files are missing."""
    p = Path(model).expanduser()
    if p.is_dir():
        ref = p / "refs" / "main"  # a repo folder of the HF cache (models--org--name): its current snapshot
        if not (p / "config.json").is_file() and ref.is_file():
            snapshot = p / "snapshots" / ref.read_text().strip()
            if snapshot.is_dir():
                return snapshot
        return p
    if p.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        what = "a file" if p.exists() else "no such folder"
        raise CheckpointError(f"{model}: not a checkpoint folder ({what}; a hub id looks like 'THUDM/glm-4-9b-chat')")
    try:
        from huggingface_hub import snapshot_download  # noqa: PLC0415 (only for hub ids)
    except ImportError:
        raise CheckpointError(f"{model}: not a local folder, and huggingface_hub is not installed") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")  # huggingface_hub's reading
    patterns = _META_PATTERNS + ["*.safetensors"]
    try:
        return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=offline))
    except Exception as e:  # noqa: BLE001 (any hub failure: fall back to whatever the cache holds)
        try:
            return Path(snapshot_download(model, allow_patterns=patterns, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise CheckpointError(
                f"{model}: no such local folder, and as a hub id not in the local HF cache and could not be "
                f"downloaded ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}). Needed: config.json, *.safetensors (+ index), tokenizer files. "
                f"Download it where online (huggingface-cli download {model}) or pass a local folder."
            ) from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The checkpoint's weight files, checking that every shard named by the index exists."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: unreadable index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise CheckpointError(f"{model_dir}: missing shard(s) named by the index: {', '.join(missing)}")
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights (only safetensors checkpoints are supported)")
    return files


def load_model(
    model_dir: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    backend: AttentionBackend | None = None,
    rope_theta_override: float | None = None,
) -> GlmForCausalLM:
    model_dir = Path(model_dir)
    cfg = load_config(model_dir, rope_theta_override)
    if quantization not in (None, "none", *QUANT_METHODS):
        raise CheckpointError(f"unknown quantization {quantization!r} (choose from none, {', '.join(QUANT_METHODS)})")
    device = torch.device(device)
    files = safetensors_files(model_dir)
    # A dry run over the files' headers first: a missing, extra or misshapen tensor is named in a second, not
    # after minutes of streaming 18 GB onto the device.
    _load_into(cfg, model_dir, files, torch.device("meta"), torch.float32, None, None, _iter_headers)
    with torch.device("meta"):
        model = GlmForCausalLM(cfg, backend)
    quant = QuantizedLoader(model, quantization, device, dtype) if quantization not in (None, "none") else None
    _load_into(cfg, model_dir, files, device, dtype, quant, model, _iter_tensors)
    model.eval()
    return model


def _load_into(cfg: ModelConfig, model_dir: Path, files: list[Path], device, dtype, quant, model, iter_tensors):
    """Fill `model` (built on the meta device; None = a throwaway one) from `files`, read by `iter_tensors`."""
    if model is None:
        with torch.device("meta"):
            model = GlmForCausalLM(cfg, None)
    # Materialise every non-quantized parameter on the target device, uninitialised; the checkpoint fills it.
    filled: dict[str, int] = {}  # our param name -> rows filled so far
    params = _materialise(model, device, dtype, skip=quant.module_names if quant else set())
    vision = _vision_loader(cfg, device, dtype)  # GLM-4V: the tower streams in beside the LM, never quantized
    seen: dict[str, str] = {}  # checkpoint tensor name -> the file it came from
    for path in files:
        for name, tensor in iter_tensors(path):
            if name in seen:  # counted twice, it would read as a wrong row count ("missing") further down
                raise CheckpointError(f"{model_dir}: tensor {name} is in both {seen[name]} and {path.name} "
                                      "(a stray extra .safetensors file in the folder?)")
            seen[name] = path.name
            if vision is not None and is_vision_name(name):
                _with_dir(model_dir, vision.place, name, tensor)
            else:
                _place(cfg, model_dir, name, tensor, params, quant, filled)
    if cfg.tie_word_embeddings and "lm_head.weight" not in filled:
        model.lm_head.weight = params["lm_head.weight"] = params["embed_tokens.weight"]
        filled["lm_head.weight"] = filled.get("embed_tokens.weight", 0)
    expected = {n: p.shape[0] for n, p in params.items()} | (quant.expected_rows() if quant else {})
    missing = sorted(n for n, rows in expected.items() if filled.get(n, 0) != rows)
    if missing:
        raise CheckpointError(f"{model_dir}: missing tensor(s) for {', '.join(missing[:8])}"
                              + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if quant:
        quant.finish()
    if vision is not None:
        model.vision = _with_dir(model_dir, vision.finish)


def _vision_loader(cfg: ModelConfig, device, dtype):
    if not cfg.vision:
        return None
    from glm_serve.model.vision import VisionTower, VisionWeightLoader  # noqa: PLC0415 (GLM-4V only)
    from glm_serve.vision_config import VisionConfig  # noqa: PLC0415

    with torch.device("meta"):
        tower = VisionTower(VisionConfig.from_dict(cfg.vision), cfg.hidden_size, cfg.intermediate_size)
    return VisionWeightLoader(tower, device, dtype)


def _with_dir(model_dir: Path, fn, *args):
    try:
        return fn(*args)
    except CheckpointError as e:  # name the checkpoint folder like every other loader error
        raise CheckpointError(f"{model_dir}: {e}") from None


def _materialise(model: GlmForCausalLM, device, dtype, skip: set[str]) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {}
    for mod_name, mod in model.named_modules():
        if mod_name in skip:
            continue
        for pname, p in list(mod.named_parameters(recurse=False)):
            t = torch.nn.Parameter(torch.empty(p.shape, device=device, dtype=dtype), requires_grad=False)
            setattr(mod, pname, t)
            params[f"{mod_name}.{pname}" if mod_name else pname] = t
    return params


def _iter_headers(path: Path):
    """(name, an empty meta tensor of its shape) from the file's header alone: what the dry run checks (names,
    shapes, float or not) without reading any data."""
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
        names = f.keys()  # a safe_open handle, not a dict
        header = [(name, f.get_slice(name)) for name in names]
        header = [(name, s.get_shape(), s.get_dtype()) for name, s in header]
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for damaged files)
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None
    for name, shape, dtype in header:
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path.name}: tensor {name} is stored as {dtype}; glm-serve loads float weights")
        yield name, torch.empty(shape, dtype=_SAFETENSORS_DTYPES[dtype], device="meta")


# Header dtype names (safetensors' spelling) -> torch; the dry run only asks "float or not" of them.
_SAFETENSORS_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
                       "I32": torch.int32, "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F32": torch.float32, "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn,
                       "F8_E5M2": torch.float8_e5m2}


def _iter_tensors(path: Path):
    try:
        f = safe_open(str(path), framework="pt", device="cpu")  # memory-mapped
        names = list(f.keys())
    except Exception as e:  # noqa: BLE001 (safetensors raises several types for damaged files)
        raise CheckpointError(f"{path.name}: not a readable safetensors file ({e})") from None
    for name in names:
        try:
            tensor = f.get_tensor(name)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path.name}: tensor {name} is unreadable, the file may be truncated ({e})") from None
        yield name, tensor


def _place(cfg: ModelConfig, model_dir: Path, name: str, tensor: torch.Tensor, params, quant, filled) -> None:
    try:
        target = map_name(cfg, name)
    except KeyError:
        raise CheckpointError(f"{model_dir}: unexpected tensor {name} for a {cfg.model_type} checkpoint") from None
    if target is None:
        return
    if quant and quant.owns(target.param):
        full_shape = quant.shape(target.param)
    elif target.param in params:
        full_shape = tuple(params[target.param].shape)
    else:
        raise CheckpointError(f"{model_dir}: unexpected tensor {name} (no {target.param} in this configuration)")
    if not tensor.dtype.is_floating_point:  # copy_ would cast it silently (bool -> 1.0, int8 codes -> numbers)
        raise CheckpointError(f"{model_dir}: tensor {name} is stored as {str(tensor.dtype).removeprefix('torch.')}; "
                              "glm-serve loads float weights (a quantized or damaged checkpoint?)")
    lo, hi = target.rows or (0, full_shape[0])
    want = (hi - lo, *full_shape[1:])
    if tuple(tensor.shape) != want:
        raise CheckpointError(f"{model_dir}: tensor {name} has shape {list(tensor.shape)}, expected {list(want)}")
    if quant and quant.owns(target.param):
        quant.fill(target.param, lo, hi, tensor)
    else:
        params[target.param][lo:hi].copy_(tensor)
    filled[target.param] = filled.get(target.param, 0) + (hi - lo)


def default_dtype(device: str | torch.device) -> torch.dtype:
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if _native_bf16(device) else torch.float16


def _native_bf16(device) -> bool:
    # Before Ampere (sm_80; V100, T4) bfloat16 is only emulated (vLLM refuses it there too); our Triton kernels are
    # built and checked for sm_80 and sm_90 only (scripts/triton-compat.sh).
    return torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | None, device) -> torch.dtype:
    if name in (None, "auto"):
        return default_dtype(device)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r} (choose from auto, {', '.join(DTYPES)})")
    if DTYPES[name] == torch.bfloat16 and torch.device(device).type == "cuda" and not _native_bf16(device):
        major, minor = torch.cuda.get_device_capability(torch.device(device))
        raise ValueError(f"--dtype bfloat16: this GPU (sm_{major}{minor}) has no native bfloat16; use --dtype float16")
    return DTYPES[name]
