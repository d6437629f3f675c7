"""Batch control through the API: errors in the vendor format, authentication, cancel (finished lines kept,
pending ones dropped), expiry (unfinished lines become errors), the worker's concurrency below interactive
traffic, and a graceful restart on the same data dir."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time

import httpx
import pytest
from api.conftest import (
    held_grammar_compiles,  # tests/ is on sys.path (rootdir-relative packages)
)
from starlette.datastructures import UploadFile

import glm_serve.batch.routes as batch_routes
import glm_serve.batch.worker as worker_mod

from .conftest import (
    batch_line,
    chat_body,
    content,
    create,
    frozen,
    read_jsonl,
    upload,
    wait_batch,
    wait_for,
    write_jsonl,
)

KEY = "batchid.batch-secret-batch-secret-batch-secret"


def _err(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code, body
    return body["message"]


def _get(server, batch_id):
    return httpx.get(f"{server.vendor_base}batches/{batch_id}").json()


def test_errors_use_vendor_codes(server, tmp_path):
    base = server.vendor_base
    path = write_jsonl(tmp_path / "in.jsonl", [batch_line("a", chat_body("hi", max_tokens=1))])
    assert "purpose" in _err(httpx.post(base + "files", files={"file": ("a.jsonl", b"{}")},
                                        data={"purpose": "fine-tune"}), 400, "1214")
    assert "purpose" in _err(httpx.post(base + "files", files={"file": ("a.jsonl", b"{}")}), 400, "1213")
    assert "file" in _err(httpx.post(base + "files", data={"purpose": "batch"}), 400, "1213")
    fid = upload(base, path)
    assert "input_file_id" in _err(httpx.post(base + "batches", json={"endpoint": "/v4/chat/completions"}),
                                   400, "1213")
    assert "endpoint" in _err(httpx.post(base + "batches", json={"input_file_id": fid}), 400, "1213")
    assert "file-nope" in _err(httpx.post(base + "batches", json={"input_file_id": "file-nope",
                                                                  "endpoint": "/v4/chat/completions"}), 400, "1214")
    _err(httpx.post(base + "batches", json={"input_file_id": fid, "endpoint": "/v4/embeddings"}), 400, "1214")
    for window in ("24", "0h", "soon", 24):
        _err(httpx.post(base + "batches", json={"input_file_id": fid, "endpoint": "/v4/chat/completions",
                                                "completion_window": window}), 400, "1214")
    _err(httpx.post(base + "batches", json={"input_file_id": fid, "endpoint": "/v4/chat/completions",
                                            "metadata": {"k": 1}}), 400, "1210")
    _err(httpx.post(base + "batches", content=b"[1]", headers={"content-type": "application/json"}), 400, "1210")
    _err(httpx.get(base + "batches/batch_nope"), 404, "1214")
    _err(httpx.post(base + "batches/batch_nope/cancel"), 404, "1214")
    _err(httpx.get(base + "files/file-nope/content"), 404, "1214")
    _err(httpx.get(base + "files/file-nope"), 404, "1214")
    listed = {f["id"]: f for f in httpx.get(base + "files").json()["data"]}
    assert httpx.get(f"{base}files/{fid}").json() == listed[fid] and listed[fid]["bytes"] == path.stat().st_size
    _err(httpx.delete(base + "files/file-nope"), 404, "1214")
    _err(httpx.get(base + "batches", params={"limit": 0}), 400, "1210")
    _err(httpx.get(base + "batches", params={"limit": "x"}), 400, "1210")
    for digit in ("²", "-²", "①", "--1"):  # digits to str.isdigit, not to int (they were 500s)
        _err(httpx.get(base + "batches", params={"limit": digit}), 400, "1210")
        _err(httpx.get(base + "files", params={"limit": digit}), 400, "1210")
    _err(httpx.get(base + "batches", params={"after": "batch_nope"}), 400, "1214")
    _err(httpx.get(base + "files", params={"order": "sideways"}), 400, "1214")
    done = wait_batch(base, create(base, fid)["id"])
    assert "completed" in _err(httpx.post(f"{base}batches/{done['id']}/cancel"), 400, "1214")


def test_empty_input_fails_the_batch(server, tmp_path):
    fid = upload(server.vendor_base, write_jsonl(tmp_path / "empty.jsonl", ["", "   "]))
    b = wait_batch(server.vendor_base, create(server.vendor_base, fid)["id"])
    assert b["status"] == "failed" and b["failed_at"] and "no request lines" in b["errors"]["data"][0]["message"]
    assert b["output_file_id"] is None and b["error_file_id"] is None


def test_a_byte_order_mark_is_no_part_of_the_first_line(server, tmp_path):
    """Files saved by Windows editors start with a UTF-8 BOM: the first line is still a request."""
    path = write_jsonl(tmp_path / "bom.jsonl", [batch_line(c, chat_body("hi", max_tokens=1)) for c in "ab"])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    b = wait_batch(server.vendor_base, create(server.vendor_base, upload(server.vendor_base, path))["id"])
    assert b["status"] == "completed" and b["request_counts"] == {"total": 2, "completed": 2, "failed": 0}, b
    assert [o["custom_id"] for o in read_jsonl(content(server.vendor_base, b["output_file_id"]))] == ["a", "b"]


def test_routes_need_the_key(make_server, tmp_path):
    srv = make_server(api_keys=[KEY], data_dir=tmp_path / "keyed")
    base, auth = srv.vendor_base, {"Authorization": f"Bearer {KEY}"}
    path = write_jsonl(tmp_path / "in.jsonl", [batch_line("a", chat_body("hi", max_tokens=1))])
    for r in (httpx.get(base + "files"), httpx.get(base + "batches"), httpx.get(base + "batches/x"),
              httpx.post(base + "batches", json={}), httpx.post(base + "files", data={"purpose": "batch"}),
              httpx.get(base + "files/x/content"), httpx.delete(base + "files/x")):
        _err(r, 401, "1001")
    b = create(base, upload(base, path, headers=auth), headers=auth)
    assert wait_batch(base, b["id"], headers=auth)["status"] == "completed"
    srv.stop()


def test_each_key_sees_only_its_own_files_and_batches(make_server, tmp_path):
    """Two keys on one server: neither can list, read, download, delete, cancel or run the other's files and
    batches (404 / 1214 as for unknown ids); a batch's output file belongs to the batch's key."""
    other_key = "otherid.other-secret-other-secret-other-secret"
    srv = make_server(api_keys=[KEY, other_key], data_dir=tmp_path / "two-keys")
    base = srv.vendor_base
    mine, theirs = {"Authorization": f"Bearer {KEY}"}, {"Authorization": f"Bearer {other_key}"}
    path = write_jsonl(tmp_path / "in.jsonl", [batch_line("a", chat_body("hi", max_tokens=1))])
    f = upload(base, path, headers=mine)
    b = wait_batch(base, create(base, f, headers=mine)["id"], headers=mine)
    assert b["status"] == "completed"
    out_id = b["output_file_id"]
    their_file = upload(base, path, headers=theirs)
    for r in (httpx.get(f"{base}files/{f}", headers=theirs), httpx.get(f"{base}files/{f}/content", headers=theirs),
              httpx.get(f"{base}files/{out_id}/content", headers=theirs), httpx.delete(f"{base}files/{f}", headers=theirs),
              httpx.get(f"{base}batches/{b['id']}", headers=theirs),
              httpx.post(f"{base}batches/{b['id']}/cancel", headers=theirs)):
        _err(r, 404, "1214")
    r = httpx.post(base + "batches", headers=theirs, json={"input_file_id": f, "endpoint": "/v4/chat/completions"})
    assert r.status_code == 400 and "no file with id" in r.json()["error"]["message"]
    assert [x["id"] for x in httpx.get(base + "files", headers=theirs).json()["data"]] == [their_file]
    assert httpx.get(base + "batches", headers=theirs).json()["data"] == []
    _err(httpx.get(base + "files", headers=theirs, params={"after": f}), 400, "1214")  # not a cursor of theirs
    assert {x["id"] for x in httpx.get(base + "files", headers=mine).json()["data"]} == {f, out_id}
    assert [x["id"] for x in httpx.get(base + "batches", headers=mine).json()["data"]] == [b["id"]]
    assert read_jsonl(content(base, out_id, headers=mine))[0]["custom_id"] == "a"
    assert httpx.delete(f"{base}files/{f}", headers=mine).json()["deleted"] is True
    srv.stop()


def _lines(n: int, max_tokens: int) -> list[str]:
    return [batch_line(f"c-{i}", chat_body(f"line {i} tell me a story", max_tokens=max_tokens)) for i in range(n)]


def test_cancel_keeps_finished_lines_and_drops_pending(server, tmp_path):
    base = server.vendor_base
    b = create(base, upload(base, write_jsonl(tmp_path / "c.jsonl", _lines(60, 48))))
    wait_for(lambda: _get(server, b["id"])["request_counts"]["completed"] >= 1, what="a first answer")
    with frozen(server.engine):  # nothing more finishes: the cancel meets lines in flight
        r = httpx.post(f"{base}batches/{b['id']}/cancel")
        assert r.status_code == 200 and r.json()["status"] in ("cancelling", "cancelled")
        done = wait_batch(base, b["id"])
    assert done["status"] == "cancelled" and done["cancelling_at"] and done["cancelled_at"]
    counts = done["request_counts"]
    assert counts["total"] == 60 and counts["failed"] == 0 and 1 <= counts["completed"] < 60
    out = read_jsonl(content(base, done["output_file_id"]))
    assert len(out) == counts["completed"] and len({o["custom_id"] for o in out}) == len(out)
    assert done["error_file_id"] is None
    assert httpx.post(f"{base}batches/{b['id']}/cancel").json()["status"] == "cancelled"  # idempotent
    wait_for(lambda: not server.engine.engine.requests, what="the engine to drop the cancelled lines")


def test_expiry_turns_unfinished_lines_into_errors(server, tmp_path):
    base = server.vendor_base
    b = create(base, upload(base, write_jsonl(tmp_path / "e.jsonl", _lines(40, 48))), window="3s")
    wait_for(lambda: _get(server, b["id"])["request_counts"]["completed"] >= 1
             or _get(server, b["id"])["status"] == "expired", what="a first answer or expiry")
    with frozen(server.engine):
        done = wait_batch(base, b["id"], timeout=30)
    assert done["status"] == "expired" and done["expired_at"] >= done["expires_at"]
    counts = done["request_counts"]
    assert counts["total"] == 40 and counts["completed"] + counts["failed"] == 40 and counts["failed"] >= 1
    out = read_jsonl(content(base, done["output_file_id"])) if done["output_file_id"] else []
    errs = read_jsonl(content(base, done["error_file_id"]))
    assert len(out) == counts["completed"] and len(errs) == counts["failed"]
    assert sorted(x["custom_id"] for x in out + errs) == sorted(f"c-{i}" for i in range(40))
    assert all(e["error"]["code"] == "batch_expired" and "3s" in e["error"]["message"] for e in errs)


def test_worker_concurrency_stays_below_interactive_traffic(make_server, tmp_path):
    srv = make_server(data_dir=tmp_path / "prio", batch_concurrency=200)
    worker, ctx = srv.worker, srv.app.state.ctx
    assert worker.concurrency == 32 and worker.busy_concurrency == 8  # capped at max_num_seqs (64) / 2
    base = srv.vendor_base
    fid = upload(base, write_jsonl(tmp_path / "p.jsonl", _lines(50, 4)))
    with frozen(srv.engine):
        slot = ctx.admission.acquire(None)  # an interactive request in flight
        b = create(base, fid)
        wait_for(lambda: worker.in_flight == 8, what="the batch to fill its busy share")
        wait_for(lambda: _get(srv, b["id"])["status"] == "in_progress", what="in_progress")
        slot.release()  # interactive traffic gone: the next poll fills the whole share
        wait_for(lambda: worker.in_flight == 32, what="the batch to fill its idle share")
    assert wait_batch(base, b["id"])["request_counts"]["completed"] == 50
    assert worker.peak_in_flight == 32
    srv.stop()


def test_worker_share_counts_each_lines_choices(make_server, tmp_path):
    """A line with n choices runs n engine sequences: 8 lines of n=3 in flight would be 24 sequences against a
    share of 8, and a chat would queue behind them (the scheduler is FCFS) for the whole batch."""
    srv = make_server(data_dir=tmp_path / "prio_n", batch_concurrency=8)
    worker, base = srv.worker, srv.vendor_base
    lines = [batch_line(f"n-{i}", chat_body(f"choices {i}", n=3)) for i in range(6)]
    lines.append(batch_line("wide", chat_body("more choices than the share", n=12)))  # runs, alone
    fid = upload(base, write_jsonl(tmp_path / "n.jsonl", lines))
    with frozen(srv.engine):
        b = create(base, fid)
        wait_for(lambda: worker.in_flight >= 2, what="the batch to fill its share")
        time.sleep(1.5)  # a worker poll (every second) later, nothing more has started
        assert (worker.in_flight, worker.seqs_in_flight) == (2, 6)
    done = wait_batch(base, b["id"])
    assert done["request_counts"] == {"total": 7, "completed": 7, "failed": 0}
    out = {o["custom_id"]: o["response"]["body"] for o in read_jsonl(content(base, done["output_file_id"]))}
    assert len(out["wide"]["choices"]) == 12 and all(len(out[f"n-{i}"]["choices"]) == 3 for i in range(6))
    srv.stop()


def test_graceful_restart_resumes_on_the_same_data_dir(make_server, tmp_path):
    data = tmp_path / "restart"
    srv = make_server(data_dir=data, batch_concurrency=4)
    base = srv.vendor_base
    b = create(base, upload(base, write_jsonl(tmp_path / "r.jsonl", _lines(30, 24))))
    wait_for(lambda: _get(srv, b["id"])["request_counts"]["completed"] >= 2, what="some answers")
    srv.stop()  # lines in flight are aborted and stay pending
    with pytest.raises(httpx.HTTPError):
        httpx.get(base + "batches", timeout=2)
    srv2 = make_server(data_dir=data, batch_concurrency=4)
    done = wait_batch(srv2.vendor_base, b["id"])
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 30
    out = read_jsonl(content(srv2.vendor_base, done["output_file_id"]))
    assert [o["custom_id"] for o in out] == [f"c-{i}" for i in range(30)]
    srv2.stop()


def test_validation_encodes_the_lines_off_the_event_loop(server, tmp_path, monkeypatch):
    """Checking and encoding an input's lines is O(input): a second or more per 80 MB, so it runs in a worker
    thread, never on the loop that serves the chats (it used to encode every body there)."""
    threads = []

    class Spy:
        def __getattr__(self, name):
            return getattr(json, name)

        @staticmethod
        def dumps(*a, **kw):
            threads.append(threading.current_thread())
            return json.dumps(*a, **kw)

    monkeypatch.setattr(worker_mod, "json", Spy())
    base = server.vendor_base
    fid = upload(base, write_jsonl(tmp_path / "in.jsonl", [batch_line(f"t-{i}", chat_body("hi", max_tokens=1))
                                                           for i in range(3)]))
    assert wait_batch(base, create(base, fid)["id"])["status"] == "completed"
    assert len(threads) >= 3 and server.thread not in threads  # server.thread runs the server's event loop


def test_file_deleted_during_a_download_request_is_a_404(server, tmp_path, monkeypatch):
    """A DELETE (or a batch's auto-delete) landing between the content route's lookup and its answer: 404 in
    the API's format, not the 500 that FileResponse raised for a path gone missing."""
    base = server.vendor_base
    src = write_jsonl(tmp_path / "数据.jsonl", [batch_line("a", chat_body("hi"))])
    fid = upload(base, src)
    r = httpx.get(f"{base}files/{fid}/content")
    assert r.content == src.read_bytes() and r.headers["content-length"] == str(src.stat().st_size)
    assert r.headers["content-disposition"] == "attachment; filename*=utf-8''%E6%95%B0%E6%8D%AE.jsonl"
    store = server.app.state.batches.store
    lookup = store.get_file

    def found_then_deleted(file_id):
        rec = lookup(file_id)
        store.delete_file(file_id)
        return rec

    monkeypatch.setattr(store, "get_file", found_then_deleted)
    assert "no file" in _err(httpx.get(f"{base}files/{fid}/content"), 404, "1214")


def test_an_upload_without_content_length_is_cut_off_at_the_limit(server, monkeypatch):
    """A chunked upload (no Content-Length) past the file limit: 413 once the limit is passed, having spooled
    about the limit, not the whole body (the form parser used to spool all of it before the size check)."""
    monkeypatch.setattr(batch_routes, "MAX_FILE_BYTES", 4096)
    spooled, real_write = [0], UploadFile.write

    async def counting_write(self, data):
        spooled[0] += len(data)
        return await real_write(self, data)

    monkeypatch.setattr(UploadFile, "write", counting_write)

    def body():
        yield (b'--xx\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--xx\r\nContent-Disposition: '
               b'form-data; name="file"; filename="a.jsonl"\r\n\r\n')
        for _ in range(64):
            yield b"x" * (1 << 20)
        yield b"\r\n--xx--\r\n"

    r = httpx.post(server.vendor_base + "files", content=body(), timeout=60,
                   headers={"content-type": "multipart/form-data; boundary=xx"})
    assert "limit" in _err(r, 413, "1210")
    assert spooled[0] < 2 << 20, f"{spooled[0] >> 20} MiB spooled for a 4 KiB limit"


def test_an_upload_cut_short_is_no_server_error(server, caplog, tmp_path):
    """A client that disconnects in the middle of its upload: logged as what it is, not as an unhandled error
    with a traceback (twice) and a 500 in /metrics; the server goes on."""
    caplog.set_level(logging.INFO, logger="glm_serve.api.errors")
    host, port = server.url.removeprefix("http://").split(":")
    head = (b"POST /api/paas/v4/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=xx\r\n"
            b"Content-Length: 1000000\r\n\r\n--xx\r\nContent-Disposition: form-data; name=\"file\"; "
            b"filename=\"a.jsonl\"\r\n\r\n")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head + b"x" * 1000)
        time.sleep(0.3)
    wait_for(lambda: any("/api/paas/v4/files" in r.getMessage() for r in caplog.records), 10, "the log line")
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert 'status="500"' not in httpx.get(server.url + "/metrics").text
    upload(server.vendor_base, write_jsonl(tmp_path / "in.jsonl", [batch_line("a", chat_body("hi"))]))


def test_a_key_without_a_dot_is_not_written_to_the_data_dir(make_server, tmp_path):
    """Files and batches record their key's id as their owner, on disk: for a key without a dot (all secret)
    that id must not be the key. Its own files still show to it, and to no other key."""
    raw_key = "rawsecret-rawsecret-rawsecret"
    data_dir = tmp_path / "raw-key"
    srv = make_server(api_keys=[raw_key, KEY], data_dir=data_dir)
    base, mine = srv.vendor_base, {"Authorization": f"Bearer {raw_key}"}
    path = write_jsonl(tmp_path / "in.jsonl", [batch_line("a", chat_body("hi", max_tokens=1))])
    f = upload(base, path, headers=mine)
    b = wait_batch(base, create(base, f, headers=mine)["id"], headers=mine)
    assert b["status"] == "completed"
    assert {x["id"] for x in httpx.get(base + "files", headers=mine).json()["data"]} == {f, b["output_file_id"]}
    assert httpx.get(base + "files", headers={"Authorization": f"Bearer {KEY}"}).json()["data"] == []
    srv.stop()
    stored = b"".join(p.read_bytes() for p in data_dir.rglob("*") if p.is_file())
    assert raw_key.encode() not in stored


def test_a_slow_grammar_compile_of_a_line_does_not_stall_the_server(server, tmp_path, monkeypatch):
    # A line's grammar is compiled when the line runs (again, unless still cached from the input check). Before,
    # run_line prepared the line on the event loop: a new schema's compile (~1 s for a string with maxLength 2000)
    # froze every other request and stream meanwhile, as the chat endpoints did before they moved it to a thread.
    # Each compile is held until /health has answered (on the event loop it could not: a ReadTimeout); no bound
    # on how fast it answers (it was timed against 0.6 s, which a loaded machine could miss on its own).
    compiles = held_grammar_compiles(server.app.state.ctx, monkeypatch)
    body = chat_body("hi", max_tokens=3, response_format={"type": "json_object"})
    fid = upload(server.vendor_base, write_jsonl(tmp_path / "in.jsonl", [batch_line("a", body)]))
    batch_id = create(server.vendor_base, fid)["id"]
    held = 0
    deadline = time.monotonic() + 120
    while _get(server, batch_id)["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, "the batch did not finish"
        go = compiles.poll()
        if go is None:
            time.sleep(0.02)
            continue
        try:
            assert httpx.get(server.url + "/health", timeout=20).status_code == 200
            assert not go.is_set()  # answered while the compile was still running
        finally:
            go.set()
        held += 1
    done = wait_batch(server.vendor_base, batch_id)
    assert done["status"] == "completed" and done["request_counts"]["completed"] == 1, done
    assert held >= 1, "no compile was seen"
