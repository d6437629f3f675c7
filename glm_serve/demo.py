"""The embedded default model: a tiny random-weight GLM-4 checkpoint, made on first use into a cache folder,
so a fresh machine serves in one command. Its weights are random: what it writes is noise."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

DEMO_VERSION = "1"  # bump when make-tiny's output changes, so old caches are not reused


def cache_dir() -> Path:
    base = os.environ.get("GLM_SERVE_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glm-serve"


def demo_checkpoint() -> Path:
    from glm_serve.tiny import TinySpec, make_tiny  # noqa: PLC0415

    target = cache_dir() / f"demo-v{DEMO_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.warning("making the demo checkpoint (tiny, RANDOM weights: its text is noise) in %s", target)
    # Written beside the target then renamed, so a crash or a concurrent start never sees half a checkpoint.
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    make_tiny(tmp, TinySpec(layout="hf", layers=2, hidden=128, heads=4, kv_heads=2, head_dim=32, ffn=256, seed=0))
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target
