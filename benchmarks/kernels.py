"""Kernel benchmark: times the Triton paged-attention kernels at GLM-4 shapes against the GPU's measured
ceilings and torch SDPA (and flex attention when available) on the same data, and records a results JSON.

    python benchmarks/kernels.py            full sweep (decode batch 1..256 x context 1K..128K, prefill 1K..32K)
    python benchmarks/kernels.py --quick    a few points
    python benchmarks/kernels.py --tune     also sweep launch parameters at the target points (figures["tune"])
    python benchmarks/kernels.py --smoke    no GPU: tiny contexts on the CPU through TRITON_INTERPRET=1, fp32 (checks
                                            that the script and the kernels' calls work; its timings mean nothing)

Shapes: 32 query heads, 2 KV heads, head_dim 128, block size 16, bf16. Every figure is the median of many
CUDA-event timings after warm-up, with L2 flushed before each timed call (so small inputs are not served from
L2). Ratios are against ceilings measured in the same run: device-to-device copy bandwidth (bytes read +
written) for decode and kv_store, a bf16 8192^3 matmul for prefill. The baselines read dense contiguous K/V
(they cannot read a paged cache); the Triton kernels read K/V scattered over shuffled 16-token blocks. Each
row also records the kernel's largest difference from the baseline's output on the same data (`max_abs_diff`),
so a figure from a kernel that computes the wrong thing shows.

Each decode point is also timed over an fp8 copy of its cache (`fp8_*`: --kv-cache-dtype fp8, half the bytes).

Decode is timed twice: eager (`triton_*`), and as replays of a CUDA graph holding the same call (`triton_graph_*`),
the way the engine's decode runs with --cuda-graphs. At batch 1 a layer's decode is a few microseconds of GPU
work, about what the Python launch of its two kernels costs, so the graph figure is the kernel's own speed; the
--tune sweep times decode configs as graph replays for the same reason.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_file import header, write  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 2, 128, 16
DTYPE = torch.bfloat16  # float32 with --smoke (the Triton interpreter has no bf16)
DEVICE = "cuda"  # "cpu" with --smoke
SCALE = HEAD_DIM**-0.5
REPO = Path(__file__).resolve().parent.parent


def bench(fn, warmup: int = 5, reps: int = 30) -> float:
    """Median milliseconds of fn() over `reps` CUDA-event timings, L2 flushed before each."""
    if DEVICE != "cuda":  # --smoke: one timed call, wall clock
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_ceilings(smoke: bool = False) -> dict:
    n, mm = (1 << 22, 256) if smoke else (1 << 29, 8192)  # 1 GiB of bf16 and 8192^3 on the GPU
    src = torch.randn(n, dtype=DTYPE, device=DEVICE)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * src.element_size() / ms / 1e6
    a = torch.randn(mm, mm, dtype=DTYPE, device=DEVICE)
    b = torch.randn(mm, mm, dtype=DTYPE, device=DEVICE)
    ms = bench(lambda: a @ b, reps=20)
    matmul_tflops = 2 * mm**3 / ms / 1e9
    # Significant digits, not decimals: every ratio divides by these (a slow CPU smoke run is far below 0.1).
    return {"copy_GBps": float(f"{copy_gbs:.4g}"), "matmul_bf16_TFLOPs": float(f"{matmul_tflops:.4g}")}


def paged_cache(batch: int, context: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random K/V caches holding `batch` sequences of `context` tokens in shuffled blocks, and their tables."""
    blocks_per_seq = math.ceil(context / BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device=DEVICE).to(torch.int32).view(batch, blocks_per_seq)
    return k_cache, v_cache, tables


def dense_kv(k_cache, v_cache, tables, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same keys, gathered into contiguous [B, KVH, context, D] tensors for the baselines."""
    batch = tables.shape[0]
    k = k_cache[tables.long()].view(batch, -1, KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()
    v = v_cache[tables.long()].view(batch, -1, KV_HEADS, HEAD_DIM)[:, :context].transpose(1, 2).contiguous()
    return k, v


def flex_attention_fn():
    """Compiled flex attention and create_block_mask, or (None, reason) when this torch lacks them."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: PLC0415

        return (torch.compile(flex_attention), create_block_mask), None
    except Exception as exc:  # any import/compile problem only removes the optional baseline
        return None, f"{type(exc).__name__}: {exc}"


def bench_decode(batch: int, context: int, num_sms: int, copy_gbs: float) -> dict:
    from glm_serve.kernels import DecodePartials, choose_num_splits, paged_decode  # noqa: PLC0415

    k_cache, v_cache, tables = paged_cache(batch, context)
    q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    splits = choose_num_splits(batch, KV_HEADS, context, num_sms)
    partials = DecodePartials.empty(batch, HEADS, HEAD_DIM, splits, DEVICE) if splits > 1 else None
    out = torch.empty_like(q)
    call = lambda: paged_decode(q, k_cache, v_cache, seq_lens, tables, SCALE, splits, out=out, partials=partials)  # noqa: E731
    ms = bench(call)
    kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k_cache.element_size()
    moved = kv_bytes + 2 * q.numel() * q.element_size()
    gbs = moved / ms / 1e6
    row = {"batch": batch, "context": context, "splits": splits, "triton_ms": round(ms, 4),
           "triton_GBps": round(gbs, 1), "triton_frac_of_copy": round(gbs / copy_gbs, 3)}  # fmt: skip
    row.update(_graph_timing(call, moved, copy_gbs))
    row.update(_fp8_decode(q, k_cache, v_cache, seq_lens, tables, splits, partials, out, copy_gbs))

    # SDPA over dense K/V; the group's query heads are folded into query rows (no K/V repeat), like ours.
    k, v = dense_kv(k_cache, v_cache, tables, context)
    k_cache = v_cache = None  # free the paged copy before the baseline runs
    qs = q.view(batch, KV_HEADS, HEADS // KV_HEADS, HEAD_DIM)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms = bench(lambda: sdpa(qs, k, v, scale=SCALE))
    row.update(sdpa_ms=round(ms, 4), sdpa_GBps=round((kv_bytes + 2 * q.numel() * 2) / ms / 1e6, 1))
    row["max_abs_diff"] = _diff(out, sdpa(qs, k, v, scale=SCALE).view(batch, HEADS, HEAD_DIM))
    return row


def _fp8_decode(q, k_cache, v_cache, seq_lens, tables, splits, partials, out_bf16, copy_gbs: float) -> dict:
    """The same decode over an fp8 copy of the cache (--kv-cache-dtype fp8): half the bytes to read (plus a
    4-byte scale per token and KV head), so up to twice as fast where decode is bound by memory. fp8_GBps
    counts the bytes it really reads; fp8_max_abs_diff is its difference from the bf16 cache's output."""
    from glm_serve.kernels import paged_decode  # noqa: PLC0415
    from glm_serve.model.attention import quantize_fp8  # noqa: PLC0415

    (k8, ks), (v8, vs) = quantize_fp8(k_cache), quantize_fp8(v_cache)
    out = torch.empty_like(q)
    call = lambda: paged_decode(q, k8, v8, seq_lens, tables, SCALE, splits, out=out, partials=partials,  # noqa: E731
                                k_scale=ks, v_scale=vs)
    ms = bench(call)
    moved = k8.numel() + v8.numel() + 4 * (ks.numel() + vs.numel()) + 2 * q.numel() * q.element_size()
    graph = _graph_timing(call, moved, copy_gbs)
    return {"fp8_ms": round(ms, 4), "fp8_GBps": round(moved / ms / 1e6, 1),
            "fp8_frac_of_copy": round(moved / ms / 1e6 / copy_gbs, 3),
            **{"fp8_" + k.removeprefix("triton_"): v for k, v in graph.items()},
            "fp8_max_abs_diff": _diff(out, out_bf16)}


def _graph_timing(call, moved: int, copy_gbs: float) -> dict:
    """The same decode captured in a CUDA graph and replayed, as the engine runs it when --cuda-graphs is on.
    An eager call pays the Python launch of two kernels (split + reduce); at batch 1 the GPU work is a few
    microseconds per layer, so eager timings can measure the launcher more than the kernel. Also proves the
    launch capturable (fixed grid, no host reads). Nothing on the CPU (--smoke)."""
    if DEVICE != "cuda":
        return {"triton_graph_ms": None}
    try:
        ms = bench(captured(call))
    except Exception as exc:  # noqa: BLE001 (recorded: a launch that cannot be captured is a finding)
        return {"triton_graph_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    gbs = moved / ms / 1e6
    return {"triton_graph_ms": round(ms, 4), "triton_graph_GBps": round(gbs, 1),
            "triton_graph_frac_of_copy": round(gbs / copy_gbs, 3)}


def captured(call):
    """call() captured once in a CUDA graph: -> its replay (call itself on the CPU)."""
    if DEVICE != "cuda":
        return call
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture wants the kernels compiled and the allocator warm
        call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return graph.replay


def tune(num_sms: int, copy_gbs: float, matmul_tflops: float, smoke: bool, figures: dict, saved=lambda: None) -> dict:
    """Launch parameters swept at the points the targets are set at (decode at batch 1 over 32K and 128K, a
    mid batch; prefill at 32K and a chunk over a 30K prefix), so the defaults can be chosen from data: every
    config's time, the default's, and the best. A config the GPU cannot run (shared memory) is recorded as
    its error; each config's output is compared with the default's on the same data. Fills `figures`
    ({"decode": [], "prefill": []}) point by point, calling saved() after each."""
    from glm_serve.kernels import DecodePartials, choose_num_splits, paged_decode, paged_prefill  # noqa: PLC0415

    for batch, context in [(1, 40), (2, 300)] if smoke else [(1, 32768), (1, 131072), (32, 8192)]:
        k_cache, v_cache, tables = paged_cache(batch, context)
        q = torch.randn(batch, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        seq_lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
        kv_bytes = 2 * batch * context * KV_HEADS * HEAD_DIM * k_cache.element_size()
        splits0 = choose_num_splits(batch, KV_HEADS, context, num_sms)
        default = {"splits": splits0, "block_n": 64, "num_warps": 4, "num_stages": 2}
        splits = sorted({n for n in (splits0 // 2, splits0, splits0 * 2, splits0 * 4) if 1 <= n <= 256})
        grid = ([(splits0, 64, 4, 2), (splits0 * 2, 32, 4, 2)] if smoke
                else itertools.product(splits, (32, 64, 128), (4, 8), (2, 3)))

        def decode(cfg: dict, out: torch.Tensor):
            n = cfg["splits"]
            partials = DecodePartials.empty(batch, HEADS, HEAD_DIM, n, DEVICE) if n > 1 else None
            # Timed as replays of a CUDA graph (the engine's decode path): eager launches would hide the
            # differences between configs behind the Python launcher at batch 1.
            return captured(lambda: paged_decode(q, k_cache, v_cache, seq_lens, tables, SCALE, n, out=out,
                                                 partials=partials, block_n=cfg["block_n"],
                                                 num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))

        figures["decode"].append(_tune_point(
            {"batch": batch, "context": context}, decode, default, grid, torch.empty_like(q),
            "frac_of_copy", lambda ms: kv_bytes / ms / 1e6 / copy_gbs))  # fmt: skip
        saved()
        k_cache = v_cache = None
        _empty_cache()
    for prefix, chunk in [(0, 37)] if smoke else [(0, 32768), (30720, 2048)]:
        context = prefix + chunk
        k_cache, v_cache, tables = paged_cache(1, context)
        q = torch.randn(chunk, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
        cu = torch.tensor([0, chunk], dtype=torch.int32, device=DEVICE)
        seq_lens = torch.tensor([context], dtype=torch.int32, device=DEVICE)
        flops = 4 * HEADS * HEAD_DIM * (chunk * prefix + chunk * (chunk + 1) / 2)
        default = {"block_m": 128, "block_n": 64, "num_warps": None, "num_stages": 2}  # None: paged_prefill picks
        grid = ([(128, 64, None, 2), (64, 32, 4, 2)] if smoke
                else [(128, 64, None, 2)] + list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))))

        def prefill(cfg: dict, out: torch.Tensor):
            return lambda: paged_prefill(q, k_cache, v_cache, cu, seq_lens, tables, chunk, SCALE, out=out, **cfg)

        figures["prefill"].append(_tune_point(
            {"prefix": prefix, "chunk": chunk}, prefill, default, grid, torch.empty_like(q),
            "frac_of_matmul", lambda ms: flops / ms / 1e9 / matmul_tflops, reps=10))  # fmt: skip
        saved()
        k_cache = v_cache = None
        _empty_cache()
    return figures


def _tune_point(point: dict, make, default: dict, grid, out: torch.Tensor, ratio: str, ratio_of_ms,
                reps: int = 30) -> dict:
    """Time make(cfg, out) for the default and every config of `grid` (tuples in default's key order): each row
    {**cfg, ms, ratio, max_abs_diff (against the default's output)} or {**cfg, error}; plus the best row."""
    make(default, out)()
    ref = out.clone()
    rows = []
    for cfg in [default] + [c for c in (dict(zip(default, values)) for values in grid) if c != default]:
        try:
            fn = make(cfg, out)
            out.fill_(float("nan"))  # an element a config leaves unwritten shows in its max_abs_diff
            ms = bench(fn, reps=reps)
            rows.append({**cfg, "ms": round(ms, 4), ratio: round(ratio_of_ms(ms), 3), "max_abs_diff": _diff(out, ref)})
        except Exception as exc:  # noqa: BLE001 (out of shared memory or registers: that config cannot run here)
            rows.append({**cfg, "error": f"{type(exc).__name__}: {str(exc)[:160]}"})
            _empty_cache()
    ok = [r for r in rows if "ms" in r and r["max_abs_diff"] < 0.05]  # bf16 outputs: a wrong config is far off
    best = min(ok, key=lambda r: r["ms"]) if ok else None
    print("tune", point, "best", best, flush=True)
    return {**point, "default": rows[0], "best": best,
            "best_speedup_over_default": round(rows[0]["ms"] / best["ms"], 3) if best and "ms" in rows[0] else None,
            "configs": rows}


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(f"{(a.float() - b.float()).abs().max().item():.3g}")


def bench_prefill(prefix: int, chunk: int, matmul_tflops: float, flex) -> dict:
    from glm_serve.kernels import paged_prefill  # noqa: PLC0415

    context = prefix + chunk
    k_cache, v_cache, tables = paged_cache(1, context)
    q = torch.randn(chunk, HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([context], dtype=torch.int32, device=DEVICE)
    out = torch.empty_like(q)
    ms = bench(lambda: paged_prefill(q, k_cache, v_cache, cu, seq_lens, tables, chunk, SCALE, out=out), reps=20)
    # Causal: query i sees prefix + i + 1 keys; 2 dots of 2 * D flops per (query, key, head).
    flops = 4 * HEADS * HEAD_DIM * (chunk * prefix + chunk * (chunk + 1) / 2)
    tflops = flops / ms / 1e9
    row = {"prefix": prefix, "chunk": chunk, "triton_ms": round(ms, 4), "triton_TFLOPs": round(tflops, 1),
           "triton_frac_of_matmul": round(tflops / matmul_tflops, 3)}  # fmt: skip

    k, v = dense_kv(k_cache, v_cache, tables, context)  # [1, KVH, context, D]
    k_cache = v_cache = None  # free the paged copy before the baselines run
    group = HEADS // KV_HEADS
    kr, vr = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # SDPA's fast paths want MHA
    qd = q.transpose(0, 1).unsqueeze(0)  # [1, H, chunk, D]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if prefix == 0:
        run_sdpa = lambda: sdpa(qd, kr, vr, is_causal=True, scale=SCALE)  # noqa: E731
    else:  # is_causal aligns top-left; a chunk after a prefix needs the explicit bottom-right mask
        pos = torch.arange(prefix, context, device=DEVICE).view(-1, 1)
        mask = torch.arange(context, device=DEVICE).view(1, -1) <= pos
        run_sdpa = lambda: sdpa(qd, kr, vr, attn_mask=mask, scale=SCALE)  # noqa: E731
    row.update(_baseline("sdpa", run_sdpa, flops))
    if "sdpa_error" not in row:
        row["max_abs_diff"] = _diff(out, run_sdpa()[0].transpose(0, 1))
    if flex is not None:
        flex_fn, create_block_mask = flex

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + prefix

        def run_flex():
            block_mask = create_block_mask(causal, None, None, chunk, context, device=DEVICE)
            return lambda: flex_fn(qd, kr, vr, block_mask=block_mask, scale=SCALE)

        row.update(_baseline("flex", run_flex, flops, build=True))
    return row


def _baseline(name: str, fn, flops: float, build: bool = False) -> dict:
    """Time one baseline; a baseline that fails (out of memory, no kernel for this shape, compile error)
    is recorded as its error instead of ending the run."""
    try:
        ms = bench(fn() if build else fn, reps=20)
    except Exception as exc:  # noqa: BLE001 (optional comparison only)
        _empty_cache()
        return {f"{name}_error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    return {f"{name}_ms": round(ms, 4), f"{name}_TFLOPs": round(flops / ms / 1e9, 1)}


def bench_store(tokens: int, copy_gbs: float) -> dict:
    from glm_serve.kernels import store_kv  # noqa: PLC0415

    k_cache, v_cache, _ = paged_cache(1, max(tokens, 65536))
    k = torch.randn(tokens, KV_HEADS, HEAD_DIM, dtype=DTYPE, device=DEVICE)
    v = torch.randn_like(k)
    slots = torch.randperm(k_cache.shape[0] * BLOCK_SIZE, device=DEVICE)[:tokens]
    ms = bench(lambda: store_kv(k, v, k_cache, v_cache, slots))
    moved = 2 * 2 * k.numel() * k.element_size() + slots.numel() * 8  # K and V read and written, slots read
    gbs = moved / ms / 1e6
    flat = (k_cache.view(-1, KV_HEADS, HEAD_DIM)[slots], v_cache.view(-1, KV_HEADS, HEAD_DIM)[slots])
    return {"tokens": tokens, "triton_ms": round(ms, 4), "triton_GBps": round(gbs, 1),
            "triton_frac_of_copy": round(gbs / copy_gbs, 3),
            "max_abs_diff": max(_diff(flat[0], k), _diff(flat[1], v))}  # fmt: skip


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def _ensure_kernels_importable() -> None:
    """Let the script run from a bare checkout (the GPU box has no install): map kernels/ to glm_serve.kernels
    the way pyproject's package-dir does."""
    sys.path.insert(0, str(REPO))  # glm_serve itself, when not installed
    try:
        import glm_serve.kernels  # noqa: F401, PLC0415
    except ImportError:
        import importlib.util  # noqa: PLC0415

        spec = importlib.util.spec_from_file_location(
            "glm_serve.kernels", REPO / "kernels" / "__init__.py", submodule_search_locations=[str(REPO / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["glm_serve.kernels"] = module
        spec.loader.exec_module(module)


def main(argv: list[str] | None = None) -> None:
    global DTYPE, DEVICE  # noqa: PLW0603 (--smoke switches the whole script to the CPU interpreter)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few points only")
    parser.add_argument("--tune", action="store_true", help="also sweep launch parameters at the target points")
    parser.add_argument("--smoke", action="store_true", help="no GPU: tiny shapes through TRITON_INTERPRET=1")
    parser.add_argument("--max-decode-tokens", type=int, default=8 << 20,
                        help="skip decode points with batch * context above this (memory)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="results JSON (default: benchmarks/results/...)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when triton is first imported, just below
        DTYPE, DEVICE = torch.float32, "cpu"
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/kernels.py needs a CUDA GPU and none is visible; nothing was measured "
                 "(--smoke runs it on the CPU through the Triton interpreter, for checking the script).")
    import triton  # noqa: PLC0415

    _ensure_kernels_importable()
    if args.smoke:
        device, num_sms = f"cpu (TRITON_INTERPRET=1, smoke run: timings mean nothing) {platform.machine()}", 8
    else:
        device = torch.cuda.get_device_name()
        num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"{device}, {num_sms} SMs, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    ceilings = measure_ceilings(args.smoke)
    print(f"ceilings: {ceilings}", flush=True)
    flex, flex_error = (None, "not tried in a smoke run") if args.smoke else flex_attention_fn()

    if args.smoke:
        batches, contexts, prefills, stores = [1, 3], [40, 300], [(0, 37), (50, 21)], [1, 19]
    elif args.quick:  # the target points (decode batch 1 at 32K, prefill 32K) and a few beside them
        batches, contexts, stores = [1, 32], [4096, 32768, 131072], [1, 8192]
        prefills = [(0, 2048), (0, 32768), (30720, 2048)]
    else:
        batches, contexts, stores = [1, 4, 16, 32, 64, 128, 256], [1024, 4096, 16384, 32768, 65536, 131072], [
            1, 64, 256, 8192]
        prefills = [(0, n) for n in (1024, 2048, 4096, 8192, 16384, 32768)] + [
            (8192, 2048), (30720, 2048), (129024, 2048)]
    results = {"decode": [], "prefill": [], "kv_store": []}
    now = datetime.datetime.now(datetime.timezone.utc)
    slug = "".join(c if c.isalnum() else "-" for c in device.lower()).strip("-")

    def save(complete: bool) -> None:
        """Written after every point, so a run cut off at a time limit still leaves what it measured."""
        record = {
            **header("kernels", device, argv),
            "complete": complete,  # False: cut off before the end (or still running); what is here was measured
            "num_sms": num_sms,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "shapes": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                       "dtype": str(DTYPE)},  # fmt: skip
            "ceilings": ceilings,
            "flex_attention": "compiled" if flex is not None else f"unavailable ({flex_error})",
            "figures": results,
        }
        write(record, args.out, f"kernels-{slug}-{now:%Y%m%d-%H%M%S}.json")

    for batch in batches:
        for context in contexts:
            if batch * context > args.max_decode_tokens:
                continue
            results["decode"].append(bench_decode(batch, context, num_sms, ceilings["copy_GBps"]))
            print("decode", results["decode"][-1], flush=True)
            save(complete=False)
            _empty_cache()
    for prefix, chunk in prefills:
        results["prefill"].append(bench_prefill(prefix, chunk, ceilings["matmul_bf16_TFLOPs"], flex))
        print("prefill", results["prefill"][-1], flush=True)
        save(complete=False)
        _empty_cache()
    for tokens in stores:
        results["kv_store"].append(bench_store(tokens, ceilings["copy_GBps"]))
        print("kv_store", results["kv_store"][-1], flush=True)
        save(complete=False)
    if args.tune:
        results["tune"] = {"decode": [], "prefill": []}
        tune(num_sms, ceilings["copy_GBps"], ceilings["matmul_bf16_TFLOPs"], args.smoke, results["tune"],
             lambda: save(complete=False))
    save(complete=True)


if __name__ == "__main__":
    main()
