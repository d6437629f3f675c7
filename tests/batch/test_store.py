"""The batch store on its own (no engine): completion windows, one process per data dir, cursor pages against
list slicing, results recorded once, and what a crash between writing a file and recording it leaves."""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
import types

import pytest

from glm_serve.batch.records import BatchRecord, parse_window
from glm_serve.batch.store import Store, default_data_dir
from glm_serve.batch.worker import BatchWorker


def _batch(file_id: str, window_s: int = 3600, auto_delete: bool = False) -> BatchRecord:
    now = int(time.time())
    return BatchRecord(id=f"batch_{random.randrange(1 << 60):x}", endpoint="/v4/chat/completions",
                       input_file_id=file_id, completion_window=f"{window_s}s", created_at=now,
                       expires_at=now + window_s, auto_delete_input_file=auto_delete)


def _started(store: Store, n: int, bad: int = 0, auto_delete: bool = False) -> tuple[BatchRecord, str]:
    f = store.add_file(io.BytesIO(b"{}\n"), "in.jsonl", "batch", 1 << 20)
    b = store.create_batch(_batch(f.id, auto_delete=auto_delete))
    items = [(i + 1, f"c{i}", json.dumps({"i": i}), "/v4/chat/completions") for i in range(n)]
    errors = [(n + j + 1, None, json.dumps({"line": n + j + 1})) for j in range(bad)]
    assert store.start_batch(b.id, items, errors)
    return b, f.id


def test_parse_window():
    assert [parse_window(w) for w in ("24h", "1s", " 30m", "2d")] == [86400, 1, 1800, 172800]
    assert parse_window("365d") == 365 * 86400
    for bad in ("0h", "24", "h", "-1h", "1w", "", None, 24, "366d", "99999999999999999999d"):
        with pytest.raises(ValueError, match="completion_window"):
            parse_window(bad)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "glm-serve"
    monkeypatch.delenv("XDG_DATA_HOME")
    assert default_data_dir().parts[-3:] == (".local", "share", "glm-serve")


def test_one_process_per_data_dir(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(ValueError, match="in use by another glm-serve"):
        Store(tmp_path)
    store.close()
    Store(tmp_path).close()  # released on close (and by the kernel when a process dies)


def test_file_pages_match_slicing(tmp_path):
    store = Store(tmp_path)
    rng = random.Random(random.randrange(1 << 30))
    ids = [store.add_file(io.BytesIO(rng.randbytes(rng.randrange(0, 300))), f"f{i}", "batch", 1 << 20).id
           for i in range(rng.randrange(5, 25))]
    for order, ref in (("asc", ids), ("desc", ids[::-1])):
        limit = rng.randrange(1, 7)
        got, after = [], None
        while True:
            page, more = store.list_files(after, limit, order)
            got += [f.id for f in page]
            assert more == (len(got) < len(ids))
            if not more:
                break
            after = page[-1].id
        assert got == ref
    victim = rng.choice(ids)
    assert store.delete_file(victim) and not store.delete_file(victim)
    assert not store.file_path(victim).exists() and store.get_file(victim) is None
    with pytest.raises(KeyError):
        store.list_files(victim, 5)
    with pytest.raises(ValueError, match="limit"):
        store.add_file(io.BytesIO(b"x" * 11), "big", "batch", 10)
    assert sorted(p.name for p in store.files_dir.iterdir()) == sorted(set(ids) - {victim})
    store.close()


def test_each_line_keeps_its_endpoint_and_older_rows_are_the_vendors(tmp_path):
    """A line's url (its schema) is stored with it; rows from data dirs older than that column read as /v4."""
    store = Store(tmp_path)
    f = store.add_file(io.BytesIO(b"{}\n"), "in.jsonl", "batch", 1 << 20)
    b = store.create_batch(_batch(f.id))
    assert store.start_batch(b.id, [(1, "a", "{}", "/v1/chat/completions"), (2, "b", "{}", "/v4/chat/completions")],
                             [])
    assert [i.url for i in store.pending_items(b.id, 10, set())] == ["/v1/chat/completions", "/v4/chat/completions"]
    store._db.execute("UPDATE items SET url = NULL")  # as the column reads in a row written before it existed
    assert [i.url for i in store.pending_items(b.id, 10, set())] == ["/v4/chat/completions"] * 2
    store.close()


def test_results_are_recorded_once_and_close_writes_input_order(tmp_path):
    store = Store(tmp_path)
    b, fid = _started(store, 6, bad=2, auto_delete=True)
    order = random.sample(range(1, 7), 6)
    for line in order[:4]:
        assert store.record_result(b.id, line, line != 3, json.dumps({"line": line}))
        assert not store.record_result(b.id, line, True, "again")  # a second answer for a line is refused
    rec = store.get_batch(b.id)
    assert (rec.total, rec.completed, rec.failed) == (8, 3 if 3 in order[:4] else 4, 3 if 3 in order[:4] else 2)
    left = sorted(order[4:])
    assert [i.line for i in store.pending_items(b.id, 10, skip={left[0]})] == left[1:]
    closed = store.close_batch(b.id, "expired", lambda cid, line: json.dumps({"expired": line}))
    assert closed.status == "expired" and closed.completed + closed.failed == 8
    out = store.file_path(closed.output_file_id).read_text().splitlines()
    errs = store.file_path(closed.error_file_id).read_text().splitlines()
    assert [json.loads(x)["line"] for x in out] == sorted(x for x in order[:4] if x != 3)
    assert len(out) + len(errs) == 8 and json.dumps({"expired": left[0]}) in errs
    assert not store.record_result(b.id, left[0], True, "late")  # a closed batch takes no results
    assert store.get_file(fid) is None  # auto_delete_input_file
    store.close()


def test_a_result_landing_while_the_batch_is_cancelling_is_kept(tmp_path):
    """A cancel lets a line that is already recording its answer finish (the worker does not cancel it): that
    answer is counted and written to the cancelled batch's output; the lines never run are dropped."""
    store = Store(tmp_path)
    b, _ = _started(store, 3)
    assert store.record_result(b.id, 1, True, json.dumps({"line": 1}))
    assert store.set_status(b.id, "cancelling", ("validating", "in_progress")).status == "cancelling"
    assert store.record_result(b.id, 2, True, json.dumps({"line": 2}))
    assert store.get_batch(b.id).completed == 2
    closed = store.close_batch(b.id, "cancelled")
    assert (closed.status, closed.completed, closed.failed, closed.error_file_id) == ("cancelled", 2, 0, None)
    out = store.file_path(closed.output_file_id).read_text().splitlines()
    assert [json.loads(x)["line"] for x in out] == [1, 2]
    store.close()


def test_a_crash_between_writing_and_recording_leaves_nothing_behind(tmp_path, monkeypatch):
    store = Store(tmp_path)
    b, _ = _started(store, 3)
    for line in (1, 2, 3):
        store.record_result(b.id, line, True, json.dumps({"line": line}))
    store.set_status(b.id, "finalizing", ("in_progress",))

    def crash(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(Store, "_insert_file", staticmethod(crash))
    with pytest.raises(RuntimeError):
        store.close_batch(b.id, "completed")
    (store.files_dir / ".tmp-file-x").write_bytes(b"half")
    store.close()
    monkeypatch.undo()
    before = {p.name for p in store.files_dir.iterdir()}
    assert len(before) == 3  # the input, the orphaned output, the temporary file
    store = Store(tmp_path)  # the restart sweeps orphans; the batch is still finalizing
    assert len(list(store.files_dir.iterdir())) == 1 and store.get_batch(b.id).status == "finalizing"
    rec = store.close_batch(b.id, "completed")
    assert rec.status == "completed" and rec.completed == 3
    assert len(store.file_path(rec.output_file_id).read_text().splitlines()) == 3
    store.close()


def test_transitions_guard_the_state(tmp_path):
    store = Store(tmp_path)
    f = store.add_file(io.BytesIO(b"{}\n"), "in.jsonl", "batch", 1 << 20)
    b = store.create_batch(_batch(f.id))
    assert store.set_status(b.id, "cancelling", ("validating", "in_progress")).status == "cancelling"
    # validation lost the race to the cancel
    assert not store.start_batch(b.id, [(1, "a", "{}", "/v4/chat/completions")], [])
    assert store.pending_items(b.id, 5, set()) == []
    assert store.set_status(b.id, "finalizing", ("in_progress",)).status == "cancelling"  # not allowed: kept
    b2 = store.create_batch(_batch(f.id))
    store.fail_batch(b2.id, [{"code": "1214", "message": "unusable"}])
    assert store.get_batch(b2.id).to_dict()["errors"]["data"][0]["message"] == "unusable"
    assert [x.id for x in store.active_batches()] == [b.id]
    page, more = store.list_batches(None, 1)
    assert [x.id for x in page] == [b2.id] and more
    assert [x.id for x in store.list_batches(b2.id, 5)[0]] == [b.id]
    store.close()


def test_a_batch_answered_in_full_completes_even_past_its_window(tmp_path):
    """Every line answered, not finalized yet when the window passed (the server was killed right after the last
    answer and restarted later, or the last answer came within a poll of the deadline): completed, not expired."""
    store = Store(tmp_path)
    b, _ = _started(store, 2)
    for line in (1, 2):
        assert store.record_result(b.id, line, True, json.dumps({"custom_id": f"c{line - 1}"}))
    with store._tx() as db:  # the window has passed
        rec = store._load(db, b.id)
        rec.expires_at = int(time.time()) - 1
        store._save(db, rec)
    ctx = types.SimpleNamespace(core=types.SimpleNamespace(config=types.SimpleNamespace(max_num_seqs=8)),
                                admission=types.SimpleNamespace(in_flight=0), engine=types.SimpleNamespace(alive=True))
    asyncio.run(BatchWorker(store, ctx).tick())
    done = store.get_batch(b.id)
    assert (done.status, done.completed, done.failed, done.error_file_id) == ("completed", 2, 0, None)
    store.close()


def _ctx():
    return types.SimpleNamespace(core=types.SimpleNamespace(config=types.SimpleNamespace(max_num_seqs=8)),
                                 admission=types.SimpleNamespace(in_flight=0), engine=types.SimpleNamespace(alive=True))


def test_a_line_in_flight_at_repeated_crashes_is_not_run_again(tmp_path, monkeypatch):
    """A line that may be what kills the process (a GPU fault, the OOM killer) would crash every restart: after
    MAX_LINE_CRASHES crashes while it was in flight it becomes an error line. A clean stop counts nothing."""
    import glm_serve.batch.worker as worker_mod

    ran = []

    async def hang(ctx, custom_id, line, body, url, owner=None):  # the line is being answered when the process dies
        ran.append(line)
        await asyncio.Event().wait()

    monkeypatch.setattr(worker_mod, "run_line", hang)

    async def run_until_crash(store: Store, clean_stop: bool) -> None:
        worker = BatchWorker(store, _ctx())
        await worker.tick()
        await asyncio.sleep(0)
        if clean_stop:
            await worker.stop()
        else:  # a kill: the tasks die with the process, nothing is written
            for entry in list(worker._running.values()):
                entry.task.cancel()
            await asyncio.sleep(0)

    store = Store(tmp_path)
    b, _ = _started(store, 2)
    store.close()
    asyncio.run(run_until_crash(store := Store(tmp_path), clean_stop=True))
    assert [i.starts for i in store.pending_items(b.id, 5, set())] == [0, 0] and ran == [1, 2]
    for crash in range(worker_mod.MAX_LINE_CRASHES):
        store.close()
        asyncio.run(run_until_crash(store := Store(tmp_path), clean_stop=False))
        assert [i.starts for i in store.pending_items(b.id, 5, set())] == [crash + 1] * 2
    store.close()
    ran.clear()
    store = Store(tmp_path)
    asyncio.run(BatchWorker(store, _ctx()).tick())  # records both as errors, then finalizes on the next pass
    asyncio.run(BatchWorker(store, _ctx()).tick())
    done = store.get_batch(b.id)
    assert ran == [] and (done.status, done.completed, done.failed) == ("completed", 0, 2)
    errors = [json.loads(x) for x in store.file_path(done.error_file_id).read_text().splitlines()]
    assert [e["line"] for e in errors] == [1, 2] and all("not run again" in e["error"]["message"] for e in errors)
    store.close()


def test_close_deletes_a_batchs_items_and_a_second_close_changes_nothing(tmp_path):
    store = Store(tmp_path)
    b, _ = _started(store, 2)
    for line in (1, 2):
        store.record_result(b.id, line, True, json.dumps({"line": line}))
    rec = store.close_batch(b.id, "completed")
    count = "SELECT COUNT(*) FROM items WHERE batch_id = ?"
    assert store._db.execute(count, (b.id,)).fetchone()[0] == 0  # its answers live in its output file
    files = sorted(p.name for p in store.files_dir.iterdir())
    again = store.close_batch(b.id, "expired")
    assert (again.status, again.output_file_id, again.completed) == ("completed", rec.output_file_id, 2)
    assert sorted(p.name for p in store.files_dir.iterdir()) == files  # no stray file from the second close
    # A data dir from before: a closed batch's items still there are deleted at the next start.
    with store._tx() as db:
        db.execute("INSERT INTO items (batch_id, line, custom_id, status, result) VALUES (?, 1, 'x', 'done', '{}')",
                   (b.id,))
    store.close()
    store = Store(tmp_path)
    assert store._db.execute(count, (b.id,)).fetchone()[0] == 0
    store.close()


def test_a_data_dir_from_before_the_crash_count_gets_its_column(tmp_path):
    import sqlite3

    db = sqlite3.connect(tmp_path / "batch.db")
    db.executescript("CREATE TABLE items (batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT, body TEXT, "
                     "status TEXT NOT NULL, result TEXT, PRIMARY KEY (batch_id, line));"
                     "INSERT INTO items VALUES ('batch_old', 1, 'a', '{}', 'pending', NULL);")
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert store._db.execute("SELECT starts FROM items WHERE batch_id = 'batch_old'").fetchone() == (0,)
    store.close()


def test_files_and_batches_show_to_their_key_and_old_rows_to_everyone(tmp_path):
    """A data dir from before files had owners: its rows are everyone's (they were made with auth off); new
    rows show to their key only, in pages too (a cursor from another key's list is unknown)."""
    import sqlite3

    db = sqlite3.connect(tmp_path / "batch.db")
    db.executescript("CREATE TABLE files (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
                     "filename TEXT NOT NULL, purpose TEXT NOT NULL, bytes INTEGER NOT NULL, "
                     "created_at INTEGER NOT NULL);"
                     "CREATE TABLE batches (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, "
                     "status TEXT NOT NULL, input_file_id TEXT NOT NULL, data TEXT NOT NULL);"
                     "INSERT INTO files (id, filename, purpose, bytes, created_at) "
                     "VALUES ('file-old', 'old.jsonl', 'batch', 3, 0);")
    db.commit()
    db.close()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "file-old").write_bytes(b"{}\n")
    store = Store(tmp_path)
    assert store.get_file("file-old").owner is None
    a = [store.add_file(io.BytesIO(b"{}\n"), f"a{i}", "batch", 1 << 20, owner="ka").id for i in range(3)]
    b = store.add_file(io.BytesIO(b"{}\n"), "b", "batch", 1 << 20, owner="kb").id

    def ids(caller, after=None, limit=10):
        return [f.id for f in store.list_files(after, limit, "asc", caller=caller)[0]]

    assert ids("ka") == ["file-old", *a] and ids("kb") == ["file-old", b] and ids(None) == ["file-old", *a, b]
    assert ids("ka", after=a[0], limit=1) == [a[1]] and store.list_files(a[0], 1, "asc", caller="ka")[1]
    assert not store.list_files(a[1], 1, "asc", caller="ka")[1]  # only kb's file follows: no more for ka
    with pytest.raises(KeyError):
        store.list_files(b, 5, caller="ka")
    batches = {}
    for owner, file_id in (("ka", a[0]), ("kb", b)):
        rec = _batch(file_id)
        rec.owner = owner
        batches[owner] = store.create_batch(rec).id
        assert store.start_batch(rec.id, [(1, "c", "{}", "/v4/chat/completions")], [])
        assert store.record_result(rec.id, 1, True, '{"ok": 1}')
        out = store.get_file(store.close_batch(rec.id, "completed").output_file_id)
        assert out.owner == owner  # a batch's output file is its key's
    assert [x.id for x in store.list_batches(None, 10, caller="kb")[0]] == [batches["kb"]]
    assert {x.id for x in store.list_batches(None, 10)[0]} == set(batches.values())
    with pytest.raises(KeyError):
        store.list_batches(batches["ka"], 10, caller="kb")
    assert store.get_batch(batches["ka"]).owner == "ka"
    store.close()


def test_result_lines_stay_one_line_for_splitlines():
    """Answers holding U+2028, U+2029 or U+0085 (str.splitlines() ends lines there; JSON leaves them raw) are
    written escaped: a reader splitting the file's text by lines gets one result per line, equal to the answer."""
    from glm_serve.batch.runner import error_line, output_line  # noqa: PLC0415

    text = "a\u2028b\u2029c\x85d 中文"
    out, err = output_line("x", {"content": text}), error_line("y", 3, "1214", text)
    for line in (out, err):
        assert line.splitlines() == [line] and "中文" in line
    assert json.loads(out)["response"]["body"]["content"] == text and json.loads(err)["error"]["message"] == text


@pytest.mark.parametrize("name", ["batch.db", "tasks.sqlite3", "responses.sqlite3"])
def test_a_data_dir_file_that_is_no_database_is_named_not_a_traceback(tmp_path, name):
    # A file cut short by hand or written by another program: the start says which file and what to do (it was
    # sqlite3's bare "file is not a database" traceback), and the data dir's lock is not left held.
    from glm_serve.api.response_store import ResponseStore  # noqa: PLC0415
    from glm_serve.api.task_log import TaskLog  # noqa: PLC0415

    (tmp_path / name).write_bytes(b"not a database, but long enough to have a header" * 4)
    opener = {"batch.db": lambda: Store(tmp_path), "tasks.sqlite3": lambda: TaskLog(tmp_path / name),
              "responses.sqlite3": lambda: ResponseStore(tmp_path / name)}[name]
    with pytest.raises(ValueError, match=f"{name} cannot be used .*move it away"):
        opener()
    (tmp_path / name).unlink()
    store = opener()  # a new one is made; for batch.db, the lock was given back
    store.close()
