"""Crash safety with real processes: `glm-serve serve` SIGKILLed in the middle of a batch and restarted on the
same data dir finishes it with every line exactly once; `glm-serve batch` SIGKILLed mid-run (plus a torn last
line, as a kill in the middle of a write leaves) and rerun does the same; the CLI's answers equal the server's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx

from glm_serve.batch.cli import OUTPUT_KEYS, read_done
from glm_serve.batch.runner import output_line
from glm_serve.cli import main as cli_main

from .conftest import (
    batch_line,
    chat_body,
    content,
    create,
    free_port,
    read_jsonl,
    upload,
    wait_batch,
    write_jsonl,
)

ENGINE_FLAGS = ["--kv-cache-tokens", "8192", "--max-num-seqs", "16", "--max-batch-tokens", "512"]


def _lines(n: int, max_tokens: int) -> list[str]:
    return [batch_line(f"k-{i}", chat_body(f"line {i}: a story about 北京", max_tokens=max_tokens))
            for i in range(n)]


def _serve(model, data_dir, port) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "glm_serve.cli", "serve", "--model", str(model), "--data-dir",
                             str(data_dir), "--port", str(port), "--served-model-name", "glm-4-plus",
                             "--batch-concurrency", "4", "--log-level", "warning", *ENGINE_FLAGS],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("server did not come up")


def test_server_sigkill_mid_batch_resumes_on_restart(tiny_hf, tmp_path):
    data, port = tmp_path / "data", free_port()
    base = f"http://127.0.0.1:{port}/api/paas/v4/"
    proc = _serve(tiny_hf, data, port)
    try:
        fid = upload(base, write_jsonl(tmp_path / "in.jsonl", _lines(200, 24) + ["{torn"]))
        b = create(base, fid)
        deadline = time.monotonic() + 120
        while (counts := httpx.get(f"{base}batches/{b['id']}").json()["request_counts"])["completed"] < 20:
            assert time.monotonic() < deadline, counts
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert counts["completed"] < 200, "the batch finished before the kill: the test proves nothing"
    proc = _serve(tiny_hf, data, port)  # same data dir: the batch resumes
    try:
        done = wait_batch(base, b["id"], timeout=180)
        assert done["status"] == "completed"
        assert done["request_counts"] == {"total": 201, "completed": 200, "failed": 1}
        out = read_jsonl(content(base, done["output_file_id"]))
        errs = read_jsonl(content(base, done["error_file_id"]))
        assert [o["custom_id"] for o in out] == [f"k-{i}" for i in range(200)]  # each once, input order
        assert [e["line"] for e in errs] == [201]
        # a line answered before the kill and one after it are both the chat endpoint's answers
        for i in (0, 199):
            want = httpx.post(base + "chat/completions", json=json.loads(_lines(200, 24)[i])["body"], timeout=60)
            assert out[i]["response"]["body"]["choices"] == want.json()["choices"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_cli_sigkill_and_rerun_answers_every_line_once(tiny_hf, tmp_path):
    lines = _lines(200, 24)
    lines[50:50] = ["not json", batch_line("k-7", chat_body("dup"))]  # two errors: a bad line, a duplicate
    src, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    errors = tmp_path / "out.errors.jsonl"
    cmd = [sys.executable, "-m", "glm_serve.cli", "batch", str(src), "-o", str(out), "--model", str(tiny_hf),
           "--served-model-name", "glm-4-plus", "--concurrency", "4", "--no-progress", *ENGINE_FLAGS]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() or out.read_bytes().count(b"\n") < 20:
            assert proc.poll() is None and time.monotonic() < deadline, "the CLI stopped early"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    written = out.read_bytes().count(b"\n")
    assert written < 200, "the CLI finished before the kill: the test proves nothing"
    with open(out, "ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"custom_id": "k-1')
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "200 completed, 2 failed, of 202 lines" in run.stdout
    got = read_jsonl(out.read_text())
    assert sorted(o["custom_id"] for o in got) == sorted(f"k-{i}" for i in range(200))
    errs = read_jsonl(errors.read_text())
    assert sorted(e["line"] for e in errs) == [51, 52] and "duplicate" in errs[-1]["error"]["message"] + \
        errs[0]["error"]["message"]
    # a third run has nothing left to do
    again = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert "(0 answered and 0 failed in this run)" in again.stdout
    assert read_jsonl(out.read_text()) == got


def test_cli_answers_equal_the_server_batch(tiny_hf, tmp_path, make_server):
    """Vendor lines and OpenAI Batch API lines (/v1 url: OpenAI's schema and shapes; sampled above the vendor's
    temperature range, seeded) get the same answers from `glm-serve batch` as from the server's batches."""
    openai_body = lambda i: {"model": "glm-4-plus", "messages": [{"role": "user", "content": f"q {i}"}],  # noqa: E731
                             "temperature": 1.5, "seed": i, "max_completion_tokens": 8}
    lines = [batch_line(f"s-{i}", chat_body(f"question {i} 数学", max_tokens=8)) if i % 2 else
             batch_line(f"s-{i}", openai_body(i), url="/v1/chat/completions") for i in range(12)]
    src, out = write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "cli.jsonl"
    assert cli_main(["batch", str(src), "-o", str(out), "--model", str(tiny_hf), "--no-progress",
                     *ENGINE_FLAGS]) == 0
    srv = make_server(data_dir=tmp_path / "data")
    b = wait_batch(srv.vendor_base, create(srv.vendor_base, upload(srv.vendor_base, src))["id"])
    by_server = {o["custom_id"]: o["response"]["body"] for o in read_jsonl(content(srv.vendor_base,
                                                                                    b["output_file_id"]))}
    by_cli = {o["custom_id"]: o["response"]["body"] for o in read_jsonl(out.read_text())}
    assert by_cli.keys() == by_server.keys() == {f"s-{i}" for i in range(12)}
    for cid, body in by_cli.items():
        assert body["choices"] == by_server[cid]["choices"]
        assert body.get("object") == by_server[cid].get("object") == (None if int(cid[2:]) % 2 else "chat.completion")
        assert body["usage"]["completion_tokens"] == by_server[cid]["usage"]["completion_tokens"]
    assert not os.path.exists(tmp_path / "cli.errors.jsonl") or not (tmp_path / "cli.errors.jsonl").read_text()
    srv.stop()


def test_cli_output_belongs_to_its_input(tiny_hf, tmp_path, capsys):
    """Two jobs that both number their lines k-0..: the second one, pointed at the first one's output, is refused
    (it used to skip every line as answered and report success); an input file given as the output is refused."""
    flags = ["--model", str(tiny_hf), "--no-progress", *ENGINE_FLAGS]
    job_a = write_jsonl(tmp_path / "a.jsonl", _lines(3, 4))
    job_b = write_jsonl(tmp_path / "b.jsonl", [batch_line(f"k-{i}", chat_body(f"another question {i}", max_tokens=4))
                                               for i in range(3)])
    out = tmp_path / "results.jsonl"
    assert cli_main(["batch", str(job_a), "-o", str(out), *flags]) == 0
    answers = out.read_text()
    assert cli_main(["batch", str(job_b), "-o", str(out), *flags]) == 2
    assert "holds answers to another input" in capsys.readouterr().err
    assert out.read_text() == answers
    # The same job again resumes (nothing left), also from a copy of its input elsewhere.
    copy = tmp_path / "moved" / "a.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(job_a.read_bytes())
    assert cli_main(["batch", str(copy), "-o", str(out), *flags]) == 0
    assert "(0 answered and 0 failed in this run)" in capsys.readouterr().out
    # The same job with another model, or the same one quantized: refused before loading (answers would mix).
    other = tmp_path / "other-model"
    other.mkdir()
    for model_flags in (["--model", str(other)], ["--model", str(tiny_hf), "--quantization", "int8"]):
        assert cli_main(["batch", str(job_a), "-o", str(out), "--no-progress", *model_flags, *ENGINE_FLAGS]) == 2
        assert f"holds answers from model {tiny_hf.resolve()}; this run loads" in capsys.readouterr().err
    # The same model in other numerics (answered in float32 on this CPU): the tokens would differ, refused too
    for numerics_flags, now in ((["--dtype", "bfloat16"], "bfloat16, bfloat16 KV cache"),
                                (["--kv-cache-dtype", "fp8"], "float32, fp8 (e4m3) KV cache")):
        assert cli_main(["batch", str(job_a), "-o", str(out), *flags, *numerics_flags]) == 2
        assert (f"holds answers computed in float32, float32 KV cache; this run computes in {now}"
                in capsys.readouterr().err)
    assert cli_main(["batch", str(job_a), "-o", str(out), *flags, "--dtype", "float32"]) == 0  # what auto was
    assert out.read_text() == answers
    # Another job's input file as the output: its lines carry custom_ids but are no answers.
    assert cli_main(["batch", str(job_b), "-o", str(job_a), *flags]) == 2
    assert "is not a line `glm-serve batch` wrote" in capsys.readouterr().err
    assert len(read_jsonl(job_a.read_text())) == 3


def test_cli_refuses_a_foreign_output_untouched(tmp_path, capsys):
    """A file given as OUTPUT (or --errors) by mistake whose last line has no newline: refused as it is. The
    torn-line cut used to run first and drop that line from the user's file."""
    job = write_jsonl(tmp_path / "in.jsonl", _lines(2, 4))
    for flag in ("-o", "--errors"):
        notes = tmp_path / "notes.txt"
        notes.write_bytes(b"my notes\nthe last line, with no newline")
        before = notes.read_bytes()
        args = ["-o", str(notes)] if flag == "-o" else ["-o", str(tmp_path / "out.jsonl"), "--errors", str(notes)]
        assert cli_main(["batch", str(job), *args, "--model", str(tmp_path / "no-model"), "--no-progress"]) == 2
        assert "move the file away" in capsys.readouterr().err
        assert notes.read_bytes() == before
    # A torn line this command left (a kill in the middle of a write) is still cut on resume.
    out = tmp_path / "out.jsonl"
    whole = output_line("k-0", {"choices": []}) + "\n"
    out.write_text(whole + '{"custom_id": "k-1')
    assert read_done(out, "custom_id", OUTPUT_KEYS) == {"k-0"}
    assert out.read_text() == whole


def test_cli_output_in_a_new_folder_and_one_it_cannot_write(tiny_hf, tmp_path, capsys):
    """`-o results/out.jsonl` with results/ not there yet makes the folder (it was a FileNotFoundError traceback from
    the source record); an output or error file that cannot be written (under a file, a folder itself) is one line
    before any load (--errors used to fail so only after the model had loaded)."""
    job = write_jsonl(tmp_path / "in.jsonl", _lines(2, 4))
    out = tmp_path / "new" / "deeper" / "out.jsonl"
    assert cli_main(["batch", str(job), "-o", str(out), "--model", str(tiny_hf), "--no-progress", *ENGINE_FLAGS]) == 0
    assert len(read_jsonl(out.read_text())) == 2
    (tmp_path / "a-file").write_text("x")
    missing_model = ["--model", str(tmp_path / "no-model"), "--no-progress"]
    for args in (["-o", str(tmp_path / "a-file" / "out.jsonl")], ["-o", str(tmp_path)],
                 ["-o", str(tmp_path / "o.jsonl"), "--errors", str(tmp_path / "a-file" / "e.jsonl")]):
        assert cli_main(["batch", str(job), *args, *missing_model]) == 2
        err = capsys.readouterr().err
        assert "cannot write" in err and "Traceback" not in err and err.strip().count("\n") == 0, err


def test_cli_input_that_is_a_folder_is_named_so(tmp_path, capsys):
    """A folder given as the input was reported as a file that "does not exist"."""
    assert cli_main(["batch", str(tmp_path), "-o", str(tmp_path / "o.jsonl"), "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert "is not a file" in err and "does not exist" not in err, err
    assert cli_main(["batch", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err
