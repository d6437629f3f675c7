"""Shared fixtures: tiny random-weight checkpoints in both real layouts, written once per test session."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch


def _hub_kernels_first() -> None:
    """`python -m pytest` (scripts/test.sh) puts the repository root first on sys.path, and there our kernels/
    (installed as glm_serve.kernels) would be found as the top-level package `kernels`: the name of Hugging Face's
    kernel hub package, which transformers (5.25 on) requires and imports along with its models. The oracle tests'
    `GlmForCausalLM` then failed to import. Load the installed `kernels`, if any, with the root out of the way, so
    that every later `import kernels` gets it; ours is reached as glm_serve.kernels only."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    try:
        importlib.import_module("kernels")
    except ImportError:  # not installed (transformers before 5.25): nothing can take the name
        pass
    finally:
        sys.path[:] = saved


_hub_kernels_first()

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors. This must be set before any
# @triton.jit function is defined, i.e. before glm_serve.kernels is first imported by any test module.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from glm_serve.tiny import TinySpec, make_tiny


def _make(tmp_path_factory, name: str, **kw):
    return make_tiny(tmp_path_factory.mktemp(name), TinySpec(**kw))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """GLM-4 (glm-4-9b-chat-hf layout), 2 shards."""
    return _make(tmp_path_factory, "tiny_hf", layout="hf", shards=2, seed=0)


@pytest.fixture(scope="session")
def tiny_chatglm(tmp_path_factory):
    """The same weights (same seed) in the remote-code layout (glm-4-9b-chat)."""
    return _make(tmp_path_factory, "tiny_chatglm", layout="chatglm", shards=3, seed=0)


@pytest.fixture(scope="session")
def tiny_glm4(tmp_path_factory):
    """GLM-4-0414 (model_type glm4, sandwich norms), 4 KV heads."""
    return _make(tmp_path_factory, "tiny_glm4", layout="hf", arch="glm4", kv_heads=4, heads=8, seed=1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    # `gpu` tests need a CUDA device; everything else runs on the CPU.
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
