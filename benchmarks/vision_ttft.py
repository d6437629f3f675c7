"""GLM-4V time to first token for one image: the vision tower (1120x1120 -> 1602 embeddings) plus the prefill
of the expanded prompt, through the engine, median of several runs; writes a results JSON.

    python benchmarks/vision_ttft.py --model DIR                # a GLM-4V checkpoint
    python benchmarks/vision_ttft.py --make-tiny                # CPU smoke run on a tiny GLM-4V
    glm-serve make-tiny /data/glm4v --vision --preset glm-4-9b --device cuda && \\
      python benchmarks/vision_ttft.py --model /data/glm4v --device cuda
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from results_file import device_name, header, write  # noqa: E402


def _png() -> bytes:
    from PIL import Image  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    arr = (torch.rand(768, 1024, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--make-tiny", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from glm_serve.llm import LLM  # noqa: PLC0415
    from glm_serve.sampling_params import SamplingParams  # noqa: PLC0415

    model = args.model
    if args.make_tiny:
        from glm_serve.tiny_vision import make_tiny_vision  # noqa: PLC0415

        model = str(make_tiny_vision(tempfile.mkdtemp(prefix="tiny-v-bench-")))
    if not model:
        p.error("--model DIR or --make-tiny")
    import base64  # noqa: PLC0415

    llm = LLM(model, device=args.device, enable_prefix_caching=False, max_batch_tokens=4096)
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe this image."}]}]
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    llm.generate([msgs], params, use_tqdm=False)  # warm-up
    times, prompt_tokens = [], 0
    for _ in range(args.runs):
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = llm.generate([msgs], params, use_tqdm=False)[0]  # one token: TTFT incl. decode + preprocessing
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        prompt_tokens = res.usage["prompt_tokens"]
    ttft = statistics.median(times)
    print(f"GLM-4V TTFT (one image, {prompt_tokens} prompt tokens): {ttft * 1e3:.1f} ms (median of {args.runs})")
    result = {**header("vision_ttft", device_name(args.device), argv),
              "model": "tiny GLM-4V (make_tiny_vision)" if args.make_tiny else model,
              "prompt_tokens": prompt_tokens, "ttft_ms_median": ttft * 1e3, "ttft_ms_all": [t * 1e3 for t in times]}
    write(result, args.out, f"vision_ttft_{torch.device(args.device).type}_{dt.date.today().isoformat()}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
