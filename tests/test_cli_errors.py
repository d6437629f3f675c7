"""The command line's failure paths: a one-line error and exit 2 (never a traceback), make-tiny never leaving half a
checkpoint or a mix of two, and a terminal chat that survives a failed turn and Ctrl-C at its prompt."""

from __future__ import annotations

import json
import socket

import pytest

from glm_serve import tiny
from glm_serve.cli import main
from glm_serve.config import CheckpointError, load_config
from glm_serve.tiny import TinySpec, make_tiny


def _one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err
    for w in words:
        assert w in err, err


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_make_tiny_refuses_a_folder_holding_files(tmp_path, capsys):
    # Before: a 1-shard model.safetensors was written beside a 3-shard index and shards of an earlier run, and the
    # loader silently loaded the OLD weights (same shapes) or failed on a shape mismatch.
    out = tmp_path / "ckpt"
    assert main(["make-tiny", str(out), "--shards", "3", "--seed", "1"]) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(["make-tiny", str(out), "--seed", "2"]) == 2
    _one_line_error(capsys, "not an empty folder")
    assert sorted(p.name for p in out.iterdir()) == before
    empty = tmp_path / "empty"
    empty.mkdir()  # an existing empty folder (mktemp) is fine
    assert main(["make-tiny", str(empty)]) == 0 and (empty / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_make_tiny_interrupted_leaves_nothing(tmp_path, monkeypatch):
    # Before: config.json was written before the weights, so an interrupted (e.g. 18.8 GB --preset) run left a folder
    # that scripts/gpu-run.sh's `[ -f DIR/config.json ]` took for a finished checkpoint.
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_write_weights", boom)
    out = tmp_path / "ckpt"
    with pytest.raises(KeyboardInterrupt):
        make_tiny(out, TinySpec())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags,word", [(["--kv-heads", "0"], "--kv-heads"), (["--head-dim", "0"], "--head-dim"),
                                        (["--layers", "-1"], "--layers"), (["--rope-ratio", "0"], "--rope-ratio"),
                                        (["--preset", "glm-4-9b", "--layers", "2"], "--layers")])
def test_make_tiny_bad_sizes_are_one_line(tmp_path, capsys, flags, word):
    assert main(["make-tiny", str(tmp_path / "x"), *flags]) == 2
    _one_line_error(capsys, word)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv", [["generate", "--prompt", "x"], ["serve"], ["chat"], ["batch", "in.jsonl", "-o", "o"],
                                  ["make-tiny", "x"]])
def test_bad_device_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--device", "foo"])
    assert e.value.code == 2
    assert "invalid device 'foo'" in capsys.readouterr().err


def test_rope_theta_must_be_positive(tiny_hf, tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_hf), "--prompt", "x", "--rope-theta", "0", "--device", "cpu"]) == 2
    _one_line_error(capsys, "--rope-theta must be > 0")
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tiny_hf / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_theta": 0.0}))
    with pytest.raises(CheckpointError, match="rope_theta"):
        load_config(bad)


@pytest.mark.parametrize("flags,word", [(["--request-rate", "0"], "--request-rate"),
                                        (["--out", "/nonexistent-dir/x.json"], "--out")])
def test_bench_checks_its_flags_before_the_run(capsys, flags, word):
    # Before: --request-rate 0 was a ZeroDivisionError traceback mid-run, and an --out in a missing folder a
    # FileNotFoundError traceback after the whole benchmark had run (its results lost).
    url = f"http://127.0.0.1:{_closed_port()}"
    assert main(["bench", "--url", url, "--served-model", "m", *flags]) == 2
    _one_line_error(capsys, word)


@pytest.mark.parametrize("flags,word", [(["--max-tokens", "-3"], "--max-tokens"),
                                        (["--temperature", "-1"], "--temperature")])
def test_generate_checks_its_flags(tiny_hf, capsys, flags, word):
    assert main(["generate", "--model", str(tiny_hf), "--prompt", "hi", "--device", "cpu", *flags]) == 2
    _one_line_error(capsys, word)


def test_generate_names_a_messages_file_that_is_not_json(tiny_hf, tmp_path, capsys):
    bad = tmp_path / "m.json"
    bad.write_text('[{"role": "user", "content": "hi"}]\n[]')
    assert main(["generate", "--model", str(tiny_hf), "--messages", str(bad), "--device", "cpu"]) == 2
    _one_line_error(capsys, str(bad), "not JSON")


PER_KEY_FLAGS = ["--max-concurrency-per-key", "--max-requests-per-minute-per-key"]


@pytest.mark.parametrize("flag", PER_KEY_FLAGS)
def test_serve_checks_per_key_limits_before_loading(tmp_path, capsys, flag):
    # Before: 0 passed argparse and was refused by Admission inside create_app, after the model had loaded; with a
    # model that cannot load, the user saw the model's error instead of the flag's.
    argv = ["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "d"), flag, "0"]
    assert main(argv) == 2
    _one_line_error(capsys, flag)


@pytest.mark.parametrize("flag", PER_KEY_FLAGS)
def test_serve_warns_that_a_per_key_limit_without_keys_does_nothing(tmp_path, caplog, monkeypatch, flag):
    # Before: accepted silently, and every anonymous caller still had no limit (the operator believed otherwise).
    monkeypatch.delenv("GLM_SERVE_API_KEYS", raising=False)
    argv = ["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "d"), flag, "2"]
    with caplog.at_level("WARNING"):
        assert main(argv) == 2  # (the missing model stops it after the flags are checked)
    assert any(flag in r.getMessage() and "no key is set" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert main([*argv, "--api-key", "a.secret-secret-secret-secret"]) == 2
    assert not any("no key is set" in r.getMessage() for r in caplog.records)


def test_serve_help_says_what_shutdown_does(capsys):
    # The README's --shutdown-timeout row: answers still running end in the API's format (503), not cut off.
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "503" in out and "connections closed" not in out
    assert "needs --api-key" in out


def test_serve_refuses_a_data_dir_in_use_before_loading(tmp_path, capsys):
    # Before: the data dir's lock was first tried inside create_app, after the model had loaded (minutes for a 9B
    # checkpoint); a second server on the default data dir learned it was refused only then.
    from glm_serve.batch.store import Store  # noqa: PLC0415

    held = Store(tmp_path / "d")
    try:
        assert main(["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "d")]) == 2
        _one_line_error(capsys, "in use by another glm-serve process")
    finally:
        held.close()
    Store(tmp_path / "d").close()  # the early check left no lock behind


def test_triton_backend_without_triton_is_one_line(tiny_hf, tmp_path, capsys, monkeypatch):
    # Before: --attention-backend triton where triton is not installed (an optional extra) was an ImportError
    # traceback. None in sys.modules makes the import fail as a missing package would.
    import sys  # noqa: PLC0415

    monkeypatch.setitem(sys.modules, "glm_serve.model.triton_backend", None)
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v4/chat/completions",
                               "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    argv = ["batch", str(inp), "-o", str(tmp_path / "out.jsonl"), "--model", str(tiny_hf), "--device", "cpu",
            "--attention-backend", "triton", "--no-progress"]
    assert main(argv) == 2
    _one_line_error(capsys, "needs triton", "--attention-backend torch")


def test_serve_refuses_a_port_in_use_before_loading(tmp_path, capsys):
    # Before: uvicorn bound the port only after the model had loaded (and logged "serving on ..."): a second server
    # on a busy port learned it minutes into a 9B load. The model here cannot load: the port must be named first.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["serve", "--model", str(tmp_path / "missing"), "--port", str(port), "--data-dir", str(tmp_path / "d")]
        assert main(argv) == 2
    _one_line_error(capsys, f"cannot listen on 127.0.0.1:{port}", "--port")


def test_generate_on_a_cuda_device_that_is_not_there_is_one_line(tiny_hf, capsys, monkeypatch):
    # Before: generate took --device cuda as given and torch raised "Torch not compiled with CUDA enabled" (an
    # AssertionError traceback) at the first allocation; serve, chat and batch already said it in one line.
    import torch  # noqa: PLC0415

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["generate", "--model", str(tiny_hf), "--device", "cuda", "--prompt", "hi"]) == 2
    _one_line_error(capsys, "no CUDA device")
    # cuda:N past the machine's devices: torch's "invalid device ordinal" at the first allocation, before.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert main(["generate", "--model", str(tiny_hf), "--device", "cuda:1", "--prompt", "hi"]) == 2
    _one_line_error(capsys, "--device cuda:1", "1 CUDA device")


def test_make_tiny_writes_files_others_may_read(tmp_path):
    # Before: the folder kept mkdtemp's 0700 and the weights safetensors' 0600: a server run as another user (a
    # container) could not read a checkpoint made for it.
    import os  # noqa: PLC0415

    umask = os.umask(0o022)
    try:
        out = make_tiny(tmp_path / "ckpt", TinySpec())
    finally:
        os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644}


@pytest.mark.parametrize("flag, env", [(["--api-key", ""], None), (["--api-key", "  "], None), ([], ""),
                                       ([], " , ")])
def test_serve_refuses_an_empty_api_key_rather_than_serving_without_keys(tmp_path, capsys, monkeypatch, flag, env):
    # Before: `--api-key "$KEY"` (or GLM_SERVE_API_KEYS=$KEY) with KEY unset dropped the empty key and started a
    # server with no authentication at all, open to anyone who could reach it.
    if env is None:
        monkeypatch.delenv("GLM_SERVE_API_KEYS", raising=False)
    else:
        monkeypatch.setenv("GLM_SERVE_API_KEYS", env)
    argv = ["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "d"), *flag]
    assert main(argv) == 2
    _one_line_error(capsys, "--api-key" if flag else "GLM_SERVE_API_KEYS", "unset")


def test_make_tiny_where_no_folder_can_be_made_is_one_line(tmp_path, capsys):
    # Before: a DIR under a file (or on a read-only or missing mount) was a FileExistsError / NotADirectoryError
    # traceback from mkdir or mkdtemp.
    (tmp_path / "a-file").write_text("x")
    for out in (tmp_path / "a-file" / "ckpt", tmp_path / "a-file" / "sub" / "ckpt"):
        assert main(["make-tiny", str(out)]) == 2
        _one_line_error(capsys, "cannot create", str(out))


def test_serve_refuses_a_data_dir_it_cannot_create_before_loading(tmp_path, capsys):
    # Before: a --data-dir under a file (or on a read-only mount) was a NotADirectoryError traceback from mkdir.
    (tmp_path / "a-file").write_text("x")
    argv = ["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "a-file" / "d")]
    assert main(argv) == 2
    _one_line_error(capsys, "--data-dir", "a-file")


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    # Before: Ctrl-C while a model loaded (serve, batch, chat --model, generate) or while generate printed its answer
    # was a KeyboardInterrupt traceback from wherever torch happened to be.
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "_write_weights", interrupted)
    try:
        rc = main(["make-tiny", str(tmp_path / "ckpt")])
    except KeyboardInterrupt:
        rc = "a KeyboardInterrupt traceback"
    assert rc == 130
    _one_line_error(capsys, "interrupted")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags,word", [(["--max-tokens", "0"], "--max-tokens"),
                                        (["--temperature", "-1"], "--temperature")])
def test_chat_checks_its_flags_before_the_chat(tmp_path, capsys, flags, word):
    # Before: chat --model with --max-tokens 0 answered every turn with nothing, silently (against a server every
    # turn failed with the server's 400 instead); both are now refused at start, before any load or connection.
    assert main(["chat", "--model", str(tmp_path / "missing"), *flags]) == 2
    _one_line_error(capsys, word)
    assert main(["chat", "--url", f"http://127.0.0.1:{_closed_port()}", *flags]) == 2
    _one_line_error(capsys, word)


@pytest.mark.parametrize("flags, word", [(["--served-model-name", ""], "--served-model-name"),
                                         (["--max-queue", "-1"], "--max-queue"),
                                         (["--batch-concurrency", "0"], "--batch-concurrency"),
                                         (["--block-size", "12"], "--block-size")])
def test_serve_names_the_flag_it_refuses(tmp_path, capsys, flags, word):
    # Before: --served-model-name '' started a server that answered only to an empty model name, and some refusals
    # named the config field (max_queue, batch_concurrency, block_size) instead of the flag.
    argv = ["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "d"), *flags]
    assert main(argv) == 2
    _one_line_error(capsys, word)
