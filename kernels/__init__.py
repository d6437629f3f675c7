"""Triton kernels for paged attention (installed as `glm_serve.kernels`); imports nothing from glm_serve.

    store_kv        write one step's K/V rows into the paged cache by slot mapping     (kv_store.py)
    paged_prefill   causal attention of variable-length chunks over the paged cache    (prefill.py)
    paged_decode    one query per sequence over the paged cache, split-K + reduce      (decode.py)
    add_rms_norm, silu_mul, rope_
                    a decoder layer's small element-wise ops, one launch each          (fused.py)

Both attention kernels share their inner key-tile step (paged_tile.py); the PyTorch references of every
kernel live in reference.py.
"""

from .decode import DecodePartials, choose_num_splits, paged_decode
from .fused import add_rms_norm, rope_, silu_mul
from .kv_store import store_kv
from .prefill import paged_prefill

__all__ = ["DecodePartials", "add_rms_norm", "choose_num_splits", "paged_decode", "paged_prefill", "rope_",
           "silu_mul", "store_kv"]
