"""`glm-serve batch INPUT.jsonl -o OUTPUT.jsonl --model DIR`: a batch file answered in-process, no server.

Lines are checked and answered exactly as the server's batch worker does (runner.py), up to `--concurrency`
at once. Each result is appended as it finishes (output lines to OUTPUT, errors to OUTPUT.errors.jsonl),
flushed and fsynced, so an interrupted run loses nothing written; a rerun skips the custom_ids already in
OUTPUT and the line numbers already in the error file, after cutting a torn last line left by a crash.
Output lines therefore come in finishing order, not input order; match them by custom_id.

A rerun resumes only the job it belongs to: OUTPUT.source.json records the input's path and SHA-256 and the
model and its numerics (dtype, KV-cache dtype) when the job starts, and a run whose input differs (another file
with the same custom_ids, or the input edited since) is refused instead of skipping lines that were never answered
for it, as is a run with another model (or quantization) or other numerics, whose answers would be mixed with the
first run's in one output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("glm_serve.batch")


def add_batch_parser(sub, add_model_args) -> None:
    from glm_serve.api.serve import add_blocked_words_arg, add_engine_args  # noqa: PLC0415 (argparse only)

    b = sub.add_parser("batch", help="answer a batch JSONL file in-process (resumable), no server needed",
                       description="Answer every line of a batch input file ({custom_id, method, url, body} per "
                                   "line, the vendor's batch format) with the local model. Rerun the same command "
                                   "after an interruption to finish the job.")
    b.add_argument("input", help="input JSONL file")
    b.add_argument("-o", "--output", required=True, help="output JSONL file (appended to; a rerun resumes it)")
    b.add_argument("--errors", default=None, help="error JSONL file (default: OUTPUT with .errors.jsonl)")
    add_model_args(b)
    b.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="model names lines may ask for (default: any name: this command runs one model)")
    b.add_argument("--concurrency", type=int, default=None,
                   help="lines in flight at once (default: twice --max-num-seqs, so the engine stays full)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_blocked_words_arg(b)
    add_engine_args(b)
    b.set_defaults(fn=cmd_batch)


OUTPUT_KEYS = ("response", "error")  # besides custom_id, every output line has these (api.md's batch format)
_LINE_START = b'{"custom_id": '  # how every line this command writes begins (runner's output_line, error_line)


def errors_path(output: Path) -> Path:
    name = output.name.removesuffix(".jsonl")
    return output.with_name(name + ".errors.jsonl")


def source_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".jsonl") + ".source.json")


def model_identity(model: str, quantization: str | None) -> str:
    """What answered a job, as recorded in OUTPUT.source.json: the checkpoint (a local folder's absolute path, or
    the hub id / 'demo' as given) and its quantization."""
    path = Path(model).expanduser()
    name = str(path.resolve()) if path.is_dir() else model
    return name if quantization in (None, "none") else f"{name} ({quantization})"


def run_numerics(dtype: str, kv_cache_dtype: str, device: str | None) -> str:
    """The numerics a job's answers come from, as recorded in OUTPUT.source.json: `--dtype auto` resolved for the
    device (float32 on the CPU, bfloat16 on a GPU: the same job resumed on the other gives other tokens) and the
    KV cache's dtype. ValueError for a device or dtype this machine lacks (before the model load)."""
    from glm_serve.engine.config import resolve_device  # noqa: PLC0415 (torch)
    from glm_serve.loader import parse_dtype  # noqa: PLC0415

    name = str(parse_dtype(dtype, resolve_device(device))).removeprefix("torch.")
    return f"{name}, {'fp8 (e4m3)' if kv_cache_dtype == 'fp8' else name} KV cache"


def claim_output(src: Path, data: bytes, out_path: Path, err_path: Path, model: str | None = None,
                 numerics: str | None = None) -> None:
    """Tie OUTPUT to this input and model (see the module docstring): record the input's fingerprint and the
    model when the job starts, or check them when resuming. ValueError when OUTPUT belongs to another input, or
    was answered by another model (a resumed job would mix the answers of two models)."""
    digest = hashlib.sha256(data).hexdigest()
    side = source_path(out_path)
    started = any(p.exists() and p.stat().st_size > 0 for p in (out_path, err_path))
    if side.exists():
        try:
            record = json.loads(side.read_text())
            known = record["sha256"]
        except (ValueError, KeyError, TypeError, OSError):
            raise ValueError(f"{side} is not a source record of `glm-serve batch`; move it away") from None
        if started and known != digest:
            raise ValueError(f"{out_path} holds answers to another input (or {src} changed since that run); "
                             "choose another output, or remove it and its .errors/.source files to start over")
        was = record.get("model")  # absent in records written before models were recorded
        if started and model is not None and was is not None and was != model:
            raise ValueError(f"{out_path} holds answers from model {was}; this run loads {model}, and resuming "
                             "would mix the answers of two models: rerun with that model, or choose another output")
        was = record.get("numerics")  # absent in records written before numerics were recorded
        if started and numerics is not None and was is not None and was != numerics:
            raise ValueError(f"{out_path} holds answers computed in {was}; this run computes in {numerics}, and "
                             "resuming would mix answers of both: rerun with the --dtype and --kv-cache-dtype (and "
                             "device) of the first run, or choose another output")
        if started:
            return
    elif started:  # written before source records existed: resumed as it was
        log.warning("%s has no source record: resuming by custom_id without checking the input", out_path)
        return
    tmp = side.with_name(side.name + ".tmp")
    record = {"input": str(src.resolve()), "sha256": digest, "model": model, "numerics": numerics}
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, side)  # before any answer is written: a crash leaves a record and no answers


def read_done(path: Path, key: str, required: tuple[str, ...] = ()) -> set:
    """The `key` values of the complete lines of a file this command wrote, after cutting a torn last line
    (a crash in the middle of a write) off the file. ValueError for a line this command did not write (one
    without `key` or any of `required`: an input file given as the output has custom_ids too), checked before
    anything is cut: a file given as OUTPUT by mistake is refused untouched."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and not data[end:].startswith(_LINE_START[:len(data) - end]):
        raise ValueError(f"{path} ends in a line `glm-serve batch` did not write; move the file away or choose "
                         "another output")
    done = set()
    for n, raw in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            value = row[key]
            if any(k not in row for k in required):
                raise KeyError(required)
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}:{n} is not a line `glm-serve batch` wrote (no {key!r}); move the file "
                             "away or choose another output") from None
        done.add(value)
    if end < len(data):
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - end)
        os.truncate(path, end)
    return done


def _custom_id(raw: bytes) -> str | None:
    try:
        cid = json.loads(raw).get("custom_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return cid if isinstance(cid, str) else None


def done_before(lines: list[tuple[int, bytes]], done_ids: set, done_lines: set) -> set[int]:
    """Line numbers an earlier run finished: in the error file by line, or answered by custom_id (the first
    line carrying it: a later duplicate is an error of its own)."""
    skip, seen = set(), set()
    for line, raw in lines:
        cid = _custom_id(raw)
        if line in done_lines or (cid is not None and cid not in seen and cid in done_ids):
            skip.add(line)
        if cid is not None:
            seen.add(cid)
    return skip


class _Appender:
    """Appends lines to a file durably: one write, flush and fsync per group of lines."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(path, "ab")  # noqa: SIM115 (closed by close())

    def write(self, lines: list[str]) -> None:
        if lines:
            self.f.write("".join(line + "\n" for line in lines).encode("utf-8"))
            self.f.flush()
            os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


class _Progress:
    """done/total, lines/s and ETA from tqdm, plus generated tokens/s."""

    def __init__(self, total: int, initial: int, enabled: bool):
        from tqdm import tqdm  # noqa: PLC0415

        self.bar = tqdm(total=total, initial=initial, unit="line", disable=not enabled, dynamic_ncols=True,
                        smoothing=0.1)
        self.tokens, self.started = 0, time.monotonic()

    def update(self, lines: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.monotonic() - self.started, 1e-6)
        self.bar.set_postfix_str(f"{rate:.0f} tok/s", refresh=False)
        self.bar.update(lines)

    def close(self) -> None:
        self.bar.close()


async def run_file(ctx, lines: list[tuple[int, bytes]], done_ids: set, done_lines: set, out: _Appender,
                   err: _Appender, concurrency: int, progress: _Progress) -> tuple[int, int]:
    """Answer every line not done yet; returns (answered, failed) of this run."""
    from glm_serve.batch.runner import check_line, run_line  # noqa: PLC0415

    seen: dict[str, int] = {}  # custom_id -> first line, over the whole file (skipped lines included)
    results: asyncio.Queue = asyncio.Queue()  # (ok, line text, tokens); None = all workers are done
    counts = [0, 0]
    skip = done_before(lines, done_ids, done_lines)

    def todo():
        for line, raw in lines:
            if line in skip:
                cid = _custom_id(raw)
                if cid is not None:
                    seen.setdefault(cid, line)
                continue
            yield check_line(ctx, line, raw, seen)

    queue = todo()

    async def work():
        for item in queue:  # one shared generator: each line is taken by exactly one worker
            if not item.ok:
                await results.put((False, item.error, 0))
                continue
            await results.put(await run_line(ctx, item.custom_id, item.line, item.body, item.url))

    async def write():
        while True:
            group = [await results.get()]
            while not results.empty():
                group.append(results.get_nowait())
            done = group[-1] is None
            group = [g for g in group if g is not None]
            await asyncio.to_thread(out.write, [text for ok, text, _ in group if ok])
            await asyncio.to_thread(err.write, [text for ok, text, _ in group if not ok])
            n_ok = sum(ok for ok, _, _ in group)
            counts[0] += n_ok
            counts[1] += len(group) - n_ok
            progress.update(len(group), sum(t for _, _, t in group))
            if done:
                return

    writer = asyncio.ensure_future(write())
    try:
        await asyncio.gather(*(work() for _ in range(concurrency)))
        await results.put(None)
        await writer
    finally:
        writer.cancel()
    return counts[0], counts[1]


def cmd_batch(args) -> int:
    from glm_serve.api.context import (  # noqa: PLC0415
        ServerSettings,
        ServingContext,
        default_model_names,
    )
    from glm_serve.api.serve import blocked_words, engine_config  # noqa: PLC0415
    from glm_serve.batch.runner import iter_lines  # noqa: PLC0415
    from glm_serve.engine.async_engine import AsyncEngine  # noqa: PLC0415
    from glm_serve.engine.engine import LLMEngine  # noqa: PLC0415

    src, out_path = Path(args.input), Path(args.output)
    words = blocked_words(args.blocked_words)  # a bad list is refused before the slow model load
    err_path = Path(args.errors) if args.errors else errors_path(out_path)
    if not src.is_file():
        raise ValueError(f"input file {src} " + ("is not a file" if src.exists() else "does not exist"))
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1, got {args.concurrency}")
    if len({out_path.resolve(), err_path.resolve(), src.resolve()}) < 3:
        raise ValueError("the input, output and error files must be three different files")
    try:
        data = src.read_bytes()
    except OSError as e:  # no read permission, an I/O error
        raise ValueError(f"cannot read {src} ({e.strerror or e})") from None
    lines = list(iter_lines(data))
    if not lines:
        raise ValueError(f"{src} holds no request lines")
    try:  # the output's folder is made and its files opened now, not after a model load of minutes
        done_ids, done_lines = read_done(out_path, "custom_id", OUTPUT_KEYS), read_done(err_path, "line")
        out_path.parent.mkdir(parents=True, exist_ok=True)
        claim_output(src, data, out_path, err_path, model_identity(args.model, args.quantization),
                     run_numerics(args.dtype, args.kv_cache_dtype, args.device))
        out, err = _Appender(out_path), _Appender(err_path)
    except OSError as e:  # a folder under a file, a read-only mount, an output that is a folder
        raise ValueError(f"cannot write {e.filename or out_path} ({e.strerror or e}): choose another output "
                         "(-o, --errors)") from None
    names = args.served_model_name
    if not names:  # one model runs here: every model name the lines use is accepted
        names = sorted({b["model"] for b in (_body(raw) for _, raw in lines) if isinstance(b.get("model"), str)})
    try:
        core = LLMEngine(engine_config(args))
    except BaseException:
        out.close()
        err.close()
        raise
    engine = AsyncEngine(core)
    progress = _Progress(len(lines), len(done_before(lines, done_ids, done_lines)), enabled=not args.no_progress)
    try:
        served = (args.served_model_name or []) or [*default_model_names(args.model, core.model_path), *names]
        ctx = ServingContext(engine, ServerSettings(served_model_names=list(dict.fromkeys(served)),
                                                    blocked_words=words))
        concurrency = args.concurrency or 2 * core.config.max_num_seqs
        answered, failed = asyncio.run(run_file(ctx, lines, done_ids, done_lines, out, err, concurrency, progress))
    except KeyboardInterrupt:
        progress.close()
        print(f"glm-serve batch: interrupted; rerun the same command to finish ({out_path})", file=sys.stderr)
        return 130
    finally:
        progress.close()
        out.close()
        err.close()
        engine.shutdown()
    total_ok = len(read_done(out_path, "custom_id", OUTPUT_KEYS))
    total_failed = len(read_done(err_path, "line"))
    print(f"glm-serve batch: {total_ok} completed, {total_failed} failed, of {len(lines)} lines "
          f"({answered} answered and {failed} failed in this run); output {out_path}, errors {err_path}")
    return 0


def _body(raw: bytes) -> dict:
    try:
        body = json.loads(raw).get("body")
    except (ValueError, AttributeError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}
