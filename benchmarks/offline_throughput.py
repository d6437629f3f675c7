"""Offline throughput: N prompts of mixed input/output lengths through our engine and, in the same process on
the same checkpoint and device, through HF transformers `generate` in static batches. Prints tokens/s for
both and the ratio; writes a results JSON to benchmarks/results/.

    python benchmarks/offline_throughput.py --model DIR [--num-prompts 64 --input-len 32:256 --output-len 16:128]
    python benchmarks/offline_throughput.py --make-tiny            # CPU: a tiny random checkpoint, made here
    glm-serve make-tiny /data/glm9b --preset glm-4-9b --device cuda && \\
      python benchmarks/offline_throughput.py --model /data/glm9b --device cuda --num-prompts 256

Both sides generate exactly the requested output lengths (end-of-sequence ignored), greedy. HF runs
`--hf-batch-size` prompts per static batch (left-padded; each batch runs to its longest output), which is how
people batch with `generate`; the output tokens counted are the requested ones only, for both sides.
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_file import device_name, header, write  # noqa: E402


def _lengths(spec: str, n: int, rng: random.Random) -> list[int]:
    lo, _, hi = spec.partition(":")
    lo, hi = int(lo), int(hi or lo)
    return [rng.randint(lo, hi) for _ in range(n)]


def run_ours(model: str, prompts, outs, device, dtype, args) -> dict:
    from glm_serve.llm import LLM  # noqa: PLC0415
    from glm_serve.sampling_params import SamplingParams  # noqa: PLC0415

    llm = LLM(model, device=device, dtype=dtype, max_num_seqs=args.max_num_seqs,
              max_batch_tokens=args.max_batch_tokens, kv_cache_tokens=args.kv_cache_tokens,
              kv_cache_dtype=args.kv_cache_dtype)
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for o in outs]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    res = llm.generate(prompts, params, use_tqdm=False)
    _sync(device)
    dt_s = time.perf_counter() - t0
    produced = sum(len(r.token_ids) for r in res)
    assert produced == sum(outs), "our engine did not produce the requested lengths"
    return {"seconds": dt_s, "output_tokens": produced, "tokens_per_s": produced / dt_s,
            "preemptions": llm.engine.scheduler.num_preemptions, "kv_capacity_tokens": llm.engine.kv_capacity_tokens}


def run_hf(model_dir: str, prompts, outs, device, dtype, batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    pad = 0

    def batch_generate(idx):
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        n = max(outs[i] for i in idx)
        with torch.inference_mode():
            hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                        pad_token_id=pad, eos_token_id=None)

    batch_generate([0, 1])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        batch_generate(list(range(s, min(s + batch_size, len(prompts)))))
    _sync(device)
    dt_s = time.perf_counter() - t0
    produced = sum(outs)
    return {"seconds": dt_s, "output_tokens": produced, "tokens_per_s": produced / dt_s, "batch_size": batch_size}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="hf-layout checkpoint folder (HF transformers must load it too)")
    p.add_argument("--make-tiny", action="store_true", help="make a tiny random hf-layout checkpoint here")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", default="16:256", help="LO:HI, uniform")
    p.add_argument("--output-len", default="8:128", help="LO:HI, uniform")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-batch-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"], help="our engine's KV cache (HF's: "
                                                                                   "the model's dtype)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results/offline_<device>_<date>.json)")
    args = p.parse_args(argv)

    model = args.model
    if args.make_tiny:
        from glm_serve.tiny import TinySpec, make_tiny  # noqa: PLC0415

        model = str(make_tiny(tempfile.mkdtemp(prefix="tiny-bench-"), TinySpec(layout="hf", layers=4, hidden=256,
                                                                             heads=8, head_dim=32, ffn=512)))
    if not model:
        p.error("--model DIR or --make-tiny")
    dtype_name = args.dtype or ("bfloat16" if torch.device(args.device).type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    rng = random.Random(args.seed)
    ins, outs = _lengths(args.input_len, args.num_prompts, rng), _lengths(args.output_len, args.num_prompts, rng)
    vocab = 2000
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in ins]

    result = {
        **header("offline_throughput", device_name(args.device), argv),
        "transformers": _version("transformers"),
        "model": "tiny random (make-tiny: 4 layers, hidden 256)" if args.make_tiny else model,
        "dtype": dtype_name,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
    }
    name = f"offline_{torch.device(args.device).type}_{dt.date.today().isoformat()}.json"
    ours = run_ours(model, prompts, outs, args.device, dtype_name, args)
    print(f"ours: {ours['tokens_per_s']:.1f} tok/s ({ours['seconds']:.2f} s)")
    # Written now too: a run stopped during HF's (slower) half still leaves our figure, marked incomplete.
    write({**result, "ours": ours, "hf_generate": None, "ratio": None, "complete": False}, args.out, name)
    if torch.device(args.device).type == "cuda":
        _free_cuda()
    hf = run_hf(model, prompts, outs, args.device, dtype, args.hf_batch_size)
    ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
    print(f"HF generate (static batches of {args.hf_batch_size}): {hf['tokens_per_s']:.1f} tok/s "
          f"({hf['seconds']:.2f} s)   ratio {ratio:.2f}x")
    write({**result, "ours": ours, "hf_generate": hf, "ratio": ratio, "complete": True}, args.out, name)
    return 0


def _free_cuda() -> None:
    """Our engine's weights and KV cache (most of the GPU) go before HF loads its copy of the checkpoint."""
    import gc  # noqa: PLC0415

    gc.collect()
    torch.cuda.empty_cache()


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version  # noqa: PLC0415

        return version(pkg)
    except Exception:  # noqa: BLE001
        return None



if __name__ == "__main__":
    sys.exit(main())
