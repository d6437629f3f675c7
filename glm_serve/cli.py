"""The `glm-serve` command line: make-tiny, generate, serve (glm_serve/api/serve.py), chat (glm_serve/chat_cli.py),
batch (glm_serve/batch/cli.py), bench (glm_serve/bench.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def device_arg(value: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N (anything else is a usage error, not a torch traceback)."""
    if value in ("cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"invalid device {value!r} (choose cpu, cuda or cuda:N)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo", help="checkpoint folder, hub id, or 'demo' (a tiny random model)")
    p.add_argument("--device", type=device_arg, default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto (the default): bfloat16 on CUDA (float16 before sm_80), float32 on the CPU")
    p.add_argument("--quantization", default=None, choices=["none", "nf4", "int8"])
    p.add_argument("--rope-theta", type=float, default=None, help="override the checkpoint's RoPE base")


# make-tiny's text-model shape options and their defaults (a --vision checkpoint takes none of them)
_TINY_SIZES = {"arch": "glm", "kv_heads": 2, "heads": None, "head_dim": 32, "layers": 2, "hidden": 128, "ffn": None,
               "shards": 1, "rope_ratio": 500.0}


def cmd_make_tiny(args) -> int:
    from glm_serve.tiny import TinySpec, make_tiny  # noqa: PLC0415 (keep `--help` fast)

    # The shape options default to None in the parser, so that one given explicitly is known even at its default.
    given = [k for k in _TINY_SIZES if getattr(args, k) is not None]
    for k, v in _TINY_SIZES.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if (args.device or "cpu").startswith("cuda"):
        import torch  # noqa: PLC0415

        from glm_serve.engine.config import resolve_device  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: no CUDA device on this machine (leave it out to use the CPU)")
        resolve_device(args.device)  # cuda:N beyond the machine's devices
    if args.vision:  # GLM-4V: remote-code layout, tiny ViT + tiny LM (or the real shapes with --preset)
        from glm_serve.tiny_vision import TinyVisionSpec, make_tiny_vision  # noqa: PLC0415

        if args.layout == "hf":
            raise ValueError("--vision checkpoints exist only in the chatglm layout (as glm-4v-9b)")
        if args.max_position is not None:
            given.append("max_position")
        if given:
            raise ValueError("--vision writes a fixed tiny GLM-4V (or GLM-4V-9B's shapes with --preset); it takes no "
                             + ", ".join("--" + k.replace("_", "-") for k in given))
        preset = "glm-4v-9b" if args.preset else None
        out = make_tiny_vision(args.dir, spec=TinyVisionSpec(seed=args.seed, preset=preset), device=args.device or "cpu")
        print(f"wrote a random-weight GLM-4V checkpoint (chatglm layout) to {out}")
        return 0
    if args.preset:  # the real dimensions: a shape option would be silently overwritten
        shape = [k for k in given if k in ("kv_heads", "heads", "head_dim", "layers", "hidden", "ffn")]
        if shape:
            raise ValueError(f"--preset {args.preset} writes the real dimensions; it takes no "
                             + ", ".join("--" + k.replace("_", "-") for k in shape))
    if args.head_dim < 1:
        raise ValueError(f"--head-dim must be >= 1, got {args.head_dim}")
    max_position = 131072 if args.max_position is None else args.max_position
    if max_position < 2:
        raise ValueError(f"--max-position must be >= 2, got {max_position}")
    spec = TinySpec(layout=args.layout or "hf", arch=args.arch, layers=args.layers, hidden=args.hidden,
                    heads=args.heads or max(args.hidden // args.head_dim, args.kv_heads), kv_heads=args.kv_heads,
                    head_dim=args.head_dim, ffn=args.ffn or 2 * args.hidden, shards=args.shards, seed=args.seed,
                    rope_ratio=args.rope_ratio, preset=args.preset, max_position=max_position)
    out = make_tiny(args.dir, spec, device=args.device or "cpu")
    print(f"wrote a random-weight {spec.arch} checkpoint ({spec.layout} layout) to {out}")
    return 0


def resolve_model_arg(model: str) -> Path:
    """'demo' -> the tiny demo checkpoint (made on first use); otherwise a folder or hub id."""
    from glm_serve.loader import resolve_model_path  # noqa: PLC0415

    if model == "demo":
        from glm_serve.demo import demo_checkpoint  # noqa: PLC0415

        return demo_checkpoint()
    return resolve_model_path(model)


def cmd_generate(args) -> int:
    from glm_serve.chat import encode_chat  # noqa: PLC0415
    from glm_serve.engine.config import resolve_device  # noqa: PLC0415
    from glm_serve.loader import load_model, parse_dtype  # noqa: PLC0415
    from glm_serve.model.simple import generate_simple  # noqa: PLC0415
    from glm_serve.tokenizer import IncrementalDetokenizer, load_tokenizer  # noqa: PLC0415

    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    device = resolve_device(args.device)
    path = resolve_model_arg(args.model)
    tok = load_tokenizer(path)
    if args.messages:
        try:
            data = json.loads(Path(args.messages).read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"--messages: cannot read {args.messages} ({e.strerror or e})") from None
        except ValueError as e:
            raise ValueError(f"--messages: {args.messages} is not JSON ({e})") from None
        if isinstance(data, dict) and "messages" in data:
            messages, tools = data["messages"], data.get("tools")
        elif isinstance(data, list):
            messages, tools = data, None
        else:
            raise ValueError(f"--messages: {args.messages} must hold a list of messages or "
                             "{\"messages\": [...], \"tools\": [...]}")
    else:
        messages, tools = [{"role": "user", "content": args.prompt}], None
    ids = encode_chat(tok, messages, tools=tools, chat_template=tok.chat_template)
    model = load_model(path, device=device, dtype=parse_dtype(args.dtype, device), quantization=args.quantization,
                       rope_theta_override=args.rope_theta)
    detok = IncrementalDetokenizer(tok, skip_special_tokens=True)
    stop = set(tok.stop_token_ids)
    started = False  # the answer starts with the "\n" separator after <|assistant|>: not part of it

    def emit(text: str) -> None:
        nonlocal started
        if not started and text:
            text, started = text.removeprefix("\n"), True
        sys.stdout.write(text)
        sys.stdout.flush()

    generate_simple(model, ids, args.max_tokens, stop, temperature=args.temperature, seed=args.seed,
                    on_token=lambda t: emit(detok.add(t)) if t not in stop else None)
    emit(detok.flush())
    sys.stdout.write("\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glm-serve", description="Local inference server for GLM-4 checkpoints")
    sub = p.add_subparsers(dest="cmd", required=True)

    t = sub.add_parser("make-tiny", help="write a small random-weight GLM-4 checkpoint in a real layout")
    t.add_argument("dir")
    t.add_argument("--layout", choices=["hf", "chatglm"], default=None, help="default hf (chatglm with --vision)")
    d = _TINY_SIZES  # the parser's defaults are None: cmd_make_tiny fills these in (and knows what was given)
    t.add_argument("--arch", choices=["glm", "glm4"], default=None, help=f"glm = GLM-4, glm4 = GLM-4-0414 "
                                                                        f"(default {d['arch']})")
    t.add_argument("--kv-heads", type=int, default=None, help=f"default {d['kv_heads']}")
    t.add_argument("--heads", type=int, default=None, help="default: hidden / head-dim")
    t.add_argument("--head-dim", type=int, default=None, help=f"default {d['head_dim']}")
    t.add_argument("--layers", type=int, default=None, help=f"default {d['layers']}")
    t.add_argument("--hidden", type=int, default=None, help=f"default {d['hidden']}")
    t.add_argument("--ffn", type=int, default=None, help="default: 2 * hidden")
    t.add_argument("--shards", type=int, default=None, help=f"default {d['shards']}")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--rope-ratio", type=float, default=None, help=f"default {d['rope_ratio']}")
    t.add_argument("--max-position", type=int, default=None,
                   help="context window written into the config (default 131072; glm-4-9b-chat-1m's is 1048576, "
                        "with --layout chatglm --kv-heads 4 --rope-ratio 10000)")
    t.add_argument("--preset", choices=["glm-4-9b"], default=None,
                   help="real GLM-4-9B dimensions (18.8 GB; with --vision: GLM-4V-9B, 27.8 GB)")
    t.add_argument("--vision", action="store_true", help="a GLM-4V checkpoint (tiny ViT + LM, chatglm layout)")
    t.add_argument("--device", type=device_arg, default=None,
                   help="where to draw the random weights: cpu (default), cuda or cuda:N (cuda is much faster)")
    t.set_defaults(fn=cmd_make_tiny)

    g = sub.add_parser("generate", help="answer one prompt (or a messages JSON file) and print it")
    _add_model_args(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--messages", help="JSON file: a list of messages, or {messages, tools}")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(fn=cmd_generate)

    from glm_serve.api.serve import add_serve_parser  # noqa: PLC0415 (argparse only; FastAPI loads on use)
    from glm_serve.batch.cli import add_batch_parser  # noqa: PLC0415
    from glm_serve.bench import add_bench_parser  # noqa: PLC0415
    from glm_serve.chat_cli import add_chat_parser  # noqa: PLC0415

    add_serve_parser(sub, _add_model_args)
    add_chat_parser(sub, _add_model_args)
    add_batch_parser(sub, _add_model_args)
    add_bench_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    import logging  # noqa: PLC0415

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from glm_serve.config import CheckpointError  # noqa: PLC0415

    try:
        return args.fn(args)
    except (CheckpointError, ValueError) as e:
        print(f"glm-serve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while a model loads or an answer prints: the stop asked for, no traceback
        print("\nglm-serve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
