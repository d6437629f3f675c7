"""Fused small-ops benchmark: a GLM-4-9B decoder layer's element-wise ops as our Triton kernels
(glm_serve/kernels/fused.py) against the eager PyTorch ops of the plain model path, on the same data, at
step sizes from one decode token to a prefill chunk. Records a results JSON.

    python benchmarks/fused_ops.py            tokens 1, 32, 256, 2048 (bf16, CUDA)
    python benchmarks/fused_ops.py --smoke    no GPU: the Triton interpreter, fp32 (checks the script; its
                                              timings mean nothing)

Per op: eager and fused milliseconds (CUDA events, median, L2 flushed: benchmarks/kernels.py's timer), the
fused kernel's bytes moved as GB/s and as a fraction of the measured copy bandwidth, and the largest
difference between the two outputs. A layer runs add_rms_norm twice, rope once and silu_mul once; `layer`
sums them. At a few tokens both sides are mostly launch cost (eager RMSNorm is seven launches, RoPE about
twenty), which is what fusing saves in an eager decode step; at 2048 tokens it is memory traffic.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_file import header, write  # noqa: E402

HIDDEN, FFN = 4096, 13696  # GLM-4-9B


def _kernel_bench():
    """benchmarks/kernels.py as a module (its timer, ceilings and kernel import), by path: the name `kernels`
    is also the repository's kernel package."""
    spec = importlib.util.spec_from_file_location("kernel_bench", Path(__file__).with_name("kernels.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_ops(kb, tokens: int, copy_gbs: float) -> list[dict]:
    from glm_serve.kernels import add_rms_norm, rope_, silu_mul  # noqa: PLC0415
    from glm_serve.model.glm import RMSNorm, Rotary  # noqa: PLC0415

    dev, dtype, heads, kv_heads, head_dim = kb.DEVICE, kb.DTYPE, kb.HEADS, kb.KV_HEADS, kb.HEAD_DIM
    gen = torch.Generator(device="cpu").manual_seed(tokens)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dtype)

    es = torch.finfo(dtype).bits // 8
    rows = []

    def row(op: str, eager, fused, moved: int, diff: float) -> None:
        eager_ms, fused_ms = kb.bench(eager), kb.bench(fused)
        gbs = moved / fused_ms / 1e6
        rows.append({"op": op, "tokens": tokens, "eager_ms": round(eager_ms, 4), "triton_ms": round(fused_ms, 4),
                     "speedup": round(eager_ms / fused_ms, 2), "triton_GBps": round(gbs, 1),
                     "triton_frac_of_copy": round(gbs / copy_gbs, 3), "max_abs_diff": diff})

    # residual add + RMSNorm: reads x and h, writes the sum and the norm
    x, h = randn(tokens, HIDDEN), randn(tokens, HIDDEN)
    norm = RMSNorm(HIDDEN, 1e-5).to(dev)
    norm.weight.data = (1 + 0.1 * torch.randn(HIDDEN, generator=gen)).to(device=dev, dtype=dtype)
    want = norm(x + h)
    got = add_rms_norm(h, norm.weight, norm.eps, x)[0]
    row("add_rms_norm", lambda: norm(x + h), lambda: add_rms_norm(h, norm.weight, norm.eps, x),
        4 * tokens * HIDDEN * es, _diff(got, want))

    # RoPE on q and k (half of each head rotates), in place on views of the fused qkv projection
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim)
    rotary = Rotary(head_dim // 2, 10000.0)
    cos, sin = rotary.cos_sin(torch.randint(0, 32768, (tokens,), generator=gen).to(dev))  # [T, 1, R/2]
    flat_cos, flat_sin = cos.squeeze(1), sin.squeeze(1)

    def views(t):
        return (t[:, : heads * head_dim].view(tokens, heads, head_dim),
                t[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim))

    def eager_rope():
        q, k = views(qkv)
        return rotary.apply(q, cos, sin), rotary.apply(k, cos, sin)

    scratch = qkv.clone()
    rope_(*views(scratch), flat_cos, flat_sin)
    want_q, want_k = eager_rope()
    got_q, got_k = views(scratch)
    moved = 2 * tokens * (heads + kv_heads) * head_dim // 2 * es + 2 * flat_cos.numel() * 4
    row("rope", eager_rope, lambda: rope_(*views(scratch), flat_cos, flat_sin), moved,
        max(_diff(got_q, want_q), _diff(got_k, want_k)))

    # silu(gate) * up: reads [T, 2F], writes [T, F]
    gate_up = randn(tokens, 2 * FFN)

    def eager_silu():
        return torch.nn.functional.silu(gate_up[:, :FFN]) * gate_up[:, FFN:]

    row("silu_mul", eager_silu, lambda: silu_mul(gate_up), 3 * tokens * FFN * es,
        _diff(silu_mul(gate_up), eager_silu()))

    by_op = {r["op"]: r for r in rows}
    layer = {k: round(2 * by_op["add_rms_norm"][k] + by_op["rope"][k] + by_op["silu_mul"][k], 4)
             for k in ("eager_ms", "triton_ms")}
    rows.append({"op": "layer (2 add_rms_norm + rope + silu_mul)", "tokens": tokens, **layer,
                 "speedup": round(layer["eager_ms"] / layer["triton_ms"], 2)})
    return rows


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="no GPU: tiny runs through TRITON_INTERPRET=1")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported (by the kernel benchmark)
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/fused_ops.py needs a CUDA GPU and none is visible; nothing was measured "
                 "(--smoke runs it on the CPU through the Triton interpreter, for checking the script).")
    kb = _kernel_bench()
    if args.smoke:
        kb.DTYPE, kb.DEVICE = torch.float32, "cpu"
    kb._ensure_kernels_importable()
    device = "cpu (TRITON_INTERPRET=1, smoke run: timings mean nothing)" if args.smoke else torch.cuda.get_device_name()
    ceilings = kb.measure_ceilings(args.smoke)
    print(f"{device}; ceilings {ceilings}", flush=True)
    figures, today = [], datetime.date.today().isoformat()
    record = {**header("fused_ops", device, argv), "dtype": str(kb.DTYPE), "ceilings": ceilings, "figures": figures,
              "shapes": {"hidden": HIDDEN, "ffn": FFN, "heads": kb.HEADS, "kv_heads": kb.KV_HEADS,
                         "head_dim": kb.HEAD_DIM, "rotary_dim": kb.HEAD_DIM // 2}}
    for tokens in ([1, 5] if args.smoke else [1, 32, 256, 2048]):
        with torch.inference_mode():
            got = bench_ops(kb, tokens, ceilings["copy_GBps"])
        for r in got:
            figures.append(r)
            print(r, flush=True)
        write(record, args.out, f"fused_ops_{'smoke' if args.smoke else 'cuda'}_{today}.json")  # after every size


if __name__ == "__main__":
    main()
