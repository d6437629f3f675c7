"""The kernels compile for real GPUs (sm_80 and sm_90) on a machine without one.

The CPU tests run the kernels in Triton's interpreter, which accepts code that the compiler rejects (dot
shapes, dtype mixes, control flow). Here Triton's own compiler, with its bundled ptxas, builds every kernel
for Ampere and Hopper in a subprocess (the interpreter setting of this process would otherwise hand it
interpreted functions). On a CUDA machine the other tests compile the kernels for real, so this one skips."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from glm_serve.kernels import decode, fused, kv_store, prefill

    INT_PTRS = {"block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "cu_seqlens_q_ptr": "*i32", "slot_ptr": "*i64"}

    def signature(fn, dtype, constexprs):
        sig = {}
        quant = constexprs.get("QUANT", False)  # an fp8 cache (--kv-cache-dtype fp8) and its fp32 row scales
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name in INT_PTRS:
                sig[name] = INT_PTRS[name]
            elif name.startswith("part_") or name in ("cos_ptr", "sin_ptr") or (quant and "scale_ptr" in name):
                sig[name] = "*fp32"
            elif quant and "cache_ptr" in name:
                sig[name] = "*fp8e4nv"
            elif name.endswith("_ptr"):
                sig[name] = "*" + dtype
            else:
                sig[name] = "fp32" if name in ("scale_log2e", "eps") else "i32"
        return sig

    glm = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16)
    plain, fp8 = dict(QUANT=False), dict(QUANT=True)
    jobs = [
        (kv_store._store_kv_kernel, dict(NUM_KV_HEADS=2, BLOCK_T=16, BLOCK_H=2, **glm, **plain), 4),
        (prefill._prefill_kernel, dict(GROUP=16, BLOCK_G=16, BLOCK_T=8, BLOCK_M=128, BLOCK_N=64, **glm, **plain), 8),
        (prefill._prefill_kernel, dict(GROUP=1, BLOCK_G=1, BLOCK_T=64, BLOCK_M=64, BLOCK_N=32, HEAD_DIM=80,
                                       BLOCK_D=128, BLOCK_SIZE=1, **plain), 4),
        (decode._decode_split_kernel, dict(NUM_SPLITS=8, GROUP=16, BLOCK_G=16, BLOCK_N=64, **glm, **plain), 4),
        (decode._decode_split_kernel, dict(NUM_SPLITS=1, GROUP=8, BLOCK_G=16, BLOCK_N=64, HEAD_DIM=80,
                                           BLOCK_D=128, BLOCK_SIZE=1, **plain), 4),
        (decode._decode_reduce_kernel, dict(NUM_SPLITS=8, BLOCK_S=8, HEAD_DIM=128, BLOCK_D=128), 4),
        # the fused small ops at GLM-4-9B's sizes, as their launchers set them up
        (fused._add_rms_norm_kernel, dict(N=4096, BLOCK_ROWS=1, BLOCK_N=4096, HAS_RESIDUAL=True), 4),
        (fused._add_rms_norm_kernel, dict(N=4096, BLOCK_ROWS=1, BLOCK_N=4096, HAS_RESIDUAL=False), 4),
        (fused._silu_mul_kernel, dict(F=13696, BLOCK_ROWS=4, BLOCK_F=1024), 4),
        (fused._rope_kernel, dict(Q_HEADS=32, K_HEADS=2, HALF=32, BLOCK_T=4, BLOCK_HQ=32, BLOCK_HK=2, BLOCK_R=32), 4),
    ]
    # The fp8 cache (e4m3 needs sm_89 or later: the engine refuses it with the triton backend before that)
    fp8_jobs = [
        (kv_store._store_kv_kernel, dict(NUM_KV_HEADS=2, BLOCK_T=16, BLOCK_H=2, **glm, **fp8), 4),
        (prefill._prefill_kernel, dict(GROUP=16, BLOCK_G=16, BLOCK_T=8, BLOCK_M=128, BLOCK_N=64, **glm, **fp8), 8),
        (decode._decode_split_kernel, dict(NUM_SPLITS=8, GROUP=16, BLOCK_G=16, BLOCK_N=64, **glm, **fp8), 4),
        (decode._decode_split_kernel, dict(NUM_SPLITS=1, GROUP=8, BLOCK_G=16, BLOCK_N=64, HEAD_DIM=80,
                                           BLOCK_D=128, BLOCK_SIZE=1, **fp8), 4),
    ]
    for capability in (80, 90):
        for dtype in ("bf16", "fp16"):  # fp32 (3xTF32 dots) compiles slowly; the GPU tests cover it
            for fn, constexprs, warps in jobs + (fp8_jobs if capability >= 89 else []):
                sig = signature(fn, dtype, constexprs)
                # As at run time for GLM-4 shapes: pointers 16-byte aligned, strides multiples of 16 (this is
                # what lets Triton vectorise the loads and pipeline them).
                aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                           if sig[name].startswith("*") or name.startswith("stride")}
                src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
                kernel = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                        options={"num_warps": warps, "num_stages": 2})
                assert ".local" not in kernel.asm["ptx"], (fn.__name__, capability, "spills to local memory")
    print("compiled all")
    """
)


def _has_nvidia_backend() -> bool:
    return importlib.util.find_spec("triton.backends.nvidia") is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the GPU tests compile the kernels for real")
@pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton build has no NVIDIA backend")
def test_kernels_compile_for_ampere_and_hopper():
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled all" in done.stdout, done.stderr[-4000:]


_SPECIALIZE_SCRIPT = textwrap.dedent(
    """
    import torch
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import create_function_from_signature
    from glm_serve.kernels import (add_rms_norm, decode, fused, kv_store, paged_decode, paged_prefill, prefill,
                                   rope_, silu_mul, store_kv)

    variants = {}  # kernel name -> the distinct argument specialisations (one compiled kernel each)

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                binder = create_function_from_signature(self.fn.signature, self.fn.params, CUDABackend)
                variants.setdefault(self.fn.__name__, set()).add(repr(binder(*args, **kwargs)[1]))
            return launch

    for module, name in ((prefill, "_prefill_kernel"), (decode, "_decode_split_kernel"), (kv_store, "_store_kv_kernel"),
                         (fused, "_add_rms_norm_kernel"), (fused, "_silu_mul_kernel"), (fused, "_rope_kernel")):
        setattr(module, name, Recorder(getattr(module, name)))

    H, KVH, D, BS = 32, 2, 128, 16  # GLM-4-9B
    k_cache = torch.zeros(64, BS, KVH, D, dtype=torch.float16)
    q = torch.zeros(32, H, D, dtype=torch.float16)
    kv = torch.zeros(32, KVH, D, dtype=torch.float16)
    hidden = torch.zeros(32, 4096, dtype=torch.float16)
    qkv = torch.zeros(32, (H + 2 * KVH) * D, dtype=torch.float16)
    angles = torch.zeros(32, 32)
    for tokens in (1, 16, 17):  # a step's token count: decode of one sequence, a multiple of 16, any other
        store_kv(kv[:tokens], kv[:tokens], k_cache, k_cache, torch.zeros(tokens, dtype=torch.int64))
        add_rms_norm(hidden[:tokens], hidden[0], 1e-5, hidden[:tokens])
        silu_mul(hidden[:tokens])
        rows = qkv[:tokens]
        rope_(rows[:, : H * D].view(tokens, H, D), rows[:, H * D : (H + KVH) * D].view(tokens, KVH, D),
              angles[:tokens], angles[:tokens])
    for width in (1, 16, 3):  # block-table width: the step's longest context, in blocks
        lens = torch.full((2,), BS * width, dtype=torch.int32)
        tables = torch.zeros(2, width, dtype=torch.int32)
        paged_decode(q[:2], k_cache, k_cache, lens, tables, 0.1)
        cu = torch.tensor([0, 5, 10], dtype=torch.int32)
        paged_prefill(q[:10], k_cache, k_cache, cu, lens, tables, 5, 0.1)
    for name, keys in sorted(variants.items()):
        print(name, len(keys))
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the other kernel tests launch for real")
@pytest.mark.skipif(not _has_nvidia_backend(), reason="this triton build has no NVIDIA backend")
def test_step_sizes_do_not_make_new_kernel_variants():
    """Triton compiles a new variant of a kernel for each new specialisation of its int arguments (== 1, a
    multiple of 16, neither): seconds of a stalled engine step on a GPU, long after the start-up warm-up.
    The token count and the block-table width change every step, so they must not be specialised on."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _SPECIALIZE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.split() == ["_add_rms_norm_kernel", "1", "_decode_split_kernel", "1", "_prefill_kernel", "1",
                                   "_rope_kernel", "1", "_silu_mul_kernel", "1", "_store_kv_kernel", "1"]
