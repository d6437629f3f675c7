"""Owns the batch state on disk: a SQLite database (WAL, one transaction per state change) and a files folder
under the data dir. Crash-safe at any instant: a file is written to a temporary name, fsynced, renamed, and
only then recorded; a batch's lines live in the database from validation on, each result is recorded in its
own transaction, and start-up sweeps what a crash left half done (temporary and unrecorded files).

    DATA_DIR/batch.db     files, batches, items (one row per input line: pending -> done | failed)
    DATA_DIR/files/ID     file contents (uploads, outputs, error files)
    DATA_DIR/lock         held (flock) by the one process using this data dir

Items have no "running" state on disk: what was in flight when a process died is simply still pending. Each
item counts the runs that began and neither ended nor were stopped cleanly (`starts`): the worker stops re-running
a line that was in flight at several crashes, in case it is what crashed the process. A closed batch's items
are deleted with the close (its answers are in its files by then).
All methods are synchronous and thread-safe (one connection behind a lock); async callers use to_thread.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from glm_serve.batch.records import (
    ACTIVE,
    ENDPOINTS,
    CANCELLING,
    FAILED,
    IN_PROGRESS,
    TERMINAL,
    VALIDATING,
    BatchRecord,
    FileRecord,
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, filename TEXT NOT NULL,
    purpose TEXT NOT NULL, bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, owner TEXT);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
    input_file_id TEXT NOT NULL, data TEXT NOT NULL, owner TEXT);
CREATE TABLE IF NOT EXISTS items (
    batch_id TEXT NOT NULL, line INTEGER NOT NULL, custom_id TEXT, body TEXT, status TEXT NOT NULL,
    result TEXT, starts INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (batch_id, line));
CREATE INDEX IF NOT EXISTS items_status ON items (batch_id, status, line);
"""
PENDING, DONE, ITEM_FAILED = "pending", "done", "failed"
# Columns added since the first data dirs: (table, column, its definition), added to older databases at open.
_ADDED_COLUMNS = (("items", "starts", "INTEGER NOT NULL DEFAULT 0"), ("files", "owner", "TEXT"),
                  ("batches", "owner", "TEXT"), ("items", "url", "TEXT"))
# Rows the key `caller` may see (visible() in records.py, in SQL): args (caller, caller).
_VISIBLE = "(? IS NULL OR owner IS NULL OR owner = ?)"
_FILE_COLUMNS = "id, filename, purpose, bytes, created_at, owner"


def default_data_dir() -> Path:
    """$XDG_DATA_HOME/glm-serve, else ~/.local/share/glm-serve."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "glm-serve"


@dataclass
class Item:
    """One runnable line of a batch, as the worker takes it."""

    batch_id: str
    line: int  # 1-based line number in the input file
    custom_id: str
    body: dict = field(repr=False)
    starts: int = 0  # runs of this line that began and never ended: each a crash while it was in flight
    url: str = ENDPOINTS[0]  # the chat endpoint the line names (its schema); older data dirs stored none: /v4's


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lock_data_dir(data_dir: Path) -> int:
    """Create data_dir and take its lock (a file descriptor holding the flock); ValueError when another
    process holds it, or when it cannot be made or written (a path under a file, a read-only mount)."""
    try:
        (data_dir / "files").mkdir(parents=True, exist_ok=True)
        fd = os.open(data_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise ValueError(f"cannot use {data_dir} as the data dir ({e.strerror or e}): pass a folder this "
                         "process may write (--data-dir)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"data dir {data_dir} is in use by another glm-serve process "
                         "(pass a different --data-dir)") from None
    return fd


def check_data_dir_free(data_dir: str | Path) -> None:
    """Fail now, not after a model load of minutes, when another process holds data_dir (`glm-serve serve`)."""
    os.close(_lock_data_dir(Path(data_dir).expanduser()))  # closing the descriptor releases the flock


def open_sqlite(path: Path, schema: str) -> sqlite3.Connection:
    """One of the data dir's sqlite files, in WAL mode with every commit fsynced (a power loss loses nothing
    committed), its tables made if new. A file that is not a database (truncated by hand, another program's) is a
    ValueError naming it, not a traceback at start."""
    try:
        db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(schema)
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path} cannot be used ({e}): move it away (a new one is made) or choose another "
                         "--data-dir") from None
    return db


class Store:
    def __init__(self, data_dir: str | Path):
        self.data_dir = Path(data_dir).expanduser()
        self.files_dir = self.data_dir / "files"
        self._lock_fd = _lock_data_dir(self.data_dir)
        try:
            self._db = open_sqlite(self.data_dir / "batch.db", _SCHEMA)
        except ValueError:
            os.close(self._lock_fd)
            raise
        for table, column, definition in _ADDED_COLUMNS:  # older data dirs
            if column not in {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}:
                self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
        self._mutex = threading.RLock()
        self._sweep()

    def close(self) -> None:
        with self._mutex:
            self._db.close()
            os.close(self._lock_fd)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _sweep(self) -> None:
        """Remove what a crash left between writing a file and recording it, and the items of closed batches
        (data dirs from before close_batch deleted them)."""
        with self._tx() as db:
            db.execute(f"DELETE FROM items WHERE batch_id IN (SELECT id FROM batches WHERE status IN "
                       f"({', '.join('?' * len(TERMINAL))}))", TERMINAL)
        known = {r[0] for r in self._db.execute("SELECT id FROM files")}
        for p in self.files_dir.iterdir():
            if p.name.startswith(".tmp-") or p.name not in known:
                p.unlink(missing_ok=True)

    # ---- files -------------------------------------------------------------------------------------------

    def file_path(self, file_id: str) -> Path:
        return self.files_dir / file_id

    def add_file(self, src: BinaryIO, filename: str, purpose: str, max_bytes: int,
                 owner: str | None = None) -> FileRecord:
        """Copy a stream into the store (owned by API key `owner`); ValueError when it is larger than max_bytes."""
        file_id = f"file-{uuid.uuid4().hex}"
        tmp = self.files_dir / f".tmp-{file_id}"
        size = 0
        try:
            with open(tmp, "wb") as out:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > max_bytes:
                        raise ValueError(f"file: larger than the {max_bytes}-byte limit")
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self._commit_file(tmp, file_id, filename, purpose, size, owner)

    def _write_lines(self, lines: Iterable[str], filename: str, purpose: str, owner: str | None) -> FileRecord:
        file_id = f"file-{uuid.uuid4().hex}"
        tmp = self.files_dir / f".tmp-{file_id}"
        with open(tmp, "w", encoding="utf-8") as out:
            out.writelines(line + "\n" for line in lines)
            out.flush()
            os.fsync(out.fileno())
        return self._commit_file(tmp, file_id, filename, purpose, tmp.stat().st_size, owner, record=False)

    def _commit_file(self, tmp: Path, file_id: str, filename: str, purpose: str, size: int, owner: str | None,
                     record: bool = True) -> FileRecord:
        os.replace(tmp, self.files_dir / file_id)
        _fsync_dir(self.files_dir)
        rec = FileRecord(file_id, filename, purpose, size, int(time.time()), owner)
        if record:
            with self._tx() as db:
                self._insert_file(db, rec)
        return rec

    @staticmethod
    def _insert_file(db: sqlite3.Connection, rec: FileRecord) -> None:
        db.execute(f"INSERT INTO files ({_FILE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",
                   (rec.id, rec.filename, rec.purpose, rec.bytes, rec.created_at, rec.owner))

    def get_file(self, file_id: str) -> FileRecord | None:
        with self._mutex:
            row = self._db.execute(f"SELECT {_FILE_COLUMNS} FROM files WHERE id = ?", (file_id,)).fetchone()
        return FileRecord(*row) if row else None

    def list_files(self, after: str | None, limit: int, order: str = "desc", purpose: str | None = None,
                   caller: str | None = None) -> tuple[list[FileRecord], bool]:
        """One cursor page of the files key `caller` sees: (files after the `after` id in the given order,
        whether more follow). KeyError for an unknown `after` (or one the caller does not see)."""
        where, args = [_VISIBLE], [caller, caller]
        with self._mutex:
            if after is not None:
                row = self._db.execute(f"SELECT seq FROM files WHERE id = ? AND {_VISIBLE}",
                                       (after, caller, caller)).fetchone()
                if row is None:
                    raise KeyError(after)
                where.append("seq < ?" if order == "desc" else "seq > ?")
                args.append(row[0])
            if purpose is not None:
                where.append("purpose = ?")
                args.append(purpose)
            sql = (f"SELECT {_FILE_COLUMNS} FROM files WHERE " + " AND ".join(where)
                   + f" ORDER BY seq {'DESC' if order == 'desc' else 'ASC'} LIMIT ?")
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        return [FileRecord(*r) for r in rows[:limit]], len(rows) > limit

    def delete_file(self, file_id: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount == 1
        if gone:  # recorded first, removed second: a crash in between leaves an orphan the sweep removes
            self.file_path(file_id).unlink(missing_ok=True)
        return gone

    # ---- batches -----------------------------------------------------------------------------------------

    def create_batch(self, rec: BatchRecord) -> BatchRecord:
        with self._tx() as db:
            db.execute("INSERT INTO batches (id, status, input_file_id, data, owner) VALUES (?, ?, ?, ?, ?)",
                       (rec.id, rec.status, rec.input_file_id, json.dumps(rec.to_row()), rec.owner))
        return rec

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self._mutex:
            row = self._db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return BatchRecord.from_row(json.loads(row[0])) if row else None

    def list_batches(self, after: str | None, limit: int, caller: str | None = None
                     ) -> tuple[list[BatchRecord], bool]:
        """The batches key `caller` sees, newest first; KeyError for an unknown (or unseen) `after`."""
        with self._mutex:
            seq = None
            if after is not None:
                row = self._db.execute(f"SELECT seq FROM batches WHERE id = ? AND {_VISIBLE}",
                                       (after, caller, caller)).fetchone()
                if row is None:
                    raise KeyError(after)
                seq = row[0]
            rows = self._db.execute(
                f"SELECT data FROM batches WHERE {_VISIBLE}" + (" AND seq < ?" if seq is not None else "")
                + " ORDER BY seq DESC LIMIT ?",
                (caller, caller) + ((seq,) if seq is not None else ()) + (limit + 1,)).fetchall()
        return [BatchRecord.from_row(json.loads(r[0])) for r in rows[:limit]], len(rows) > limit

    def active_batches(self) -> list[BatchRecord]:
        """Batches the worker still has to move along, oldest first."""
        with self._mutex:
            rows = self._db.execute(f"SELECT data FROM batches WHERE status IN ({','.join('?' * len(ACTIVE))}) "
                                    "ORDER BY seq", ACTIVE).fetchall()
        return [BatchRecord.from_row(json.loads(r[0])) for r in rows]

    def _save(self, db: sqlite3.Connection, rec: BatchRecord) -> None:
        db.execute("UPDATE batches SET data = ?, status = ? WHERE id = ?",
                   (json.dumps(rec.to_row()), rec.status, rec.id))

    def _load(self, db: sqlite3.Connection, batch_id: str) -> BatchRecord:
        row = db.execute("SELECT data FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise KeyError(batch_id)
        return BatchRecord.from_row(json.loads(row[0]))

    def start_batch(self, batch_id: str, items: list[tuple[int, str, str, str]],
                    errors: list[tuple[int, str | None, str]]) -> bool:
        """validating -> in_progress with its lines: items (line, custom_id, body JSON, url) to run, and errors
        (line, custom_id, error line) found by validation. False if the batch left `validating` meanwhile."""
        with self._tx() as db:
            rec = self._load(db, batch_id)
            if rec.status != VALIDATING:
                return False
            db.executemany("INSERT INTO items (batch_id, line, custom_id, body, url, status) VALUES (?, ?, ?, ?, ?, ?)",
                           [(batch_id, line, cid, body, url, PENDING) for line, cid, body, url in items])
            db.executemany("INSERT INTO items (batch_id, line, custom_id, status, result) VALUES (?, ?, ?, ?, ?)",
                           [(batch_id, line, cid, ITEM_FAILED, err) for line, cid, err in errors])
            rec.total, rec.failed = len(items) + len(errors), len(errors)
            rec.status, rec.in_progress_at = IN_PROGRESS, int(time.time())
            self._save(db, rec)
        return True

    def fail_batch(self, batch_id: str, errors: list[dict]) -> None:
        """validating -> failed: the input is unusable. `errors`: [{code, message, line?}]."""
        with self._tx() as db:
            rec = self._load(db, batch_id)
            if rec.status != VALIDATING:
                return
            rec.status, rec.failed_at, rec.errors = FAILED, int(time.time()), errors
            self._save(db, rec)

    def set_status(self, batch_id: str, status: str, allowed_from: tuple[str, ...]) -> BatchRecord:
        """Move a batch to `status` (stamping `<status>_at`) if it is in one of `allowed_from`; returns the
        batch as it is after the call."""
        with self._tx() as db:
            rec = self._load(db, batch_id)
            if rec.status in allowed_from:
                rec.status = status
                setattr(rec, f"{status}_at", int(time.time()))
                self._save(db, rec)
        return rec

    def pending_items(self, batch_id: str, limit: int, skip: set[int]) -> list[Item]:
        """The first `limit` pending lines of a batch (input order), leaving out the lines in `skip`."""
        with self._mutex:
            rows = self._db.execute("SELECT line, custom_id, body, starts, url FROM items WHERE batch_id = ? AND "
                                    "status = ? ORDER BY line LIMIT ?",
                                    (batch_id, PENDING, limit + len(skip))).fetchall()
        return [Item(batch_id, line, cid, json.loads(body), starts, url or ENDPOINTS[0])
                for line, cid, body, starts, url in rows if line not in skip][:limit]

    def begin_items(self, batch_id: str, lines: list[int]) -> None:
        """These pending lines start running: count it (committed before they reach the engine)."""
        with self._tx() as db:
            db.executemany("UPDATE items SET starts = starts + 1 WHERE batch_id = ? AND line = ? AND status = ?",
                           [(batch_id, line, PENDING) for line in lines])

    def stop_items(self, lines: list[tuple[str, int]]) -> None:
        """Runs of these (batch id, line)s stopped cleanly (a shutdown) before their result: no crash to count."""
        with self._tx() as db:
            db.executemany("UPDATE items SET starts = MAX(starts - 1, 0) WHERE batch_id = ? AND line = ? "
                           "AND status = ?", [(batch_id, line, PENDING) for batch_id, line in lines])

    def has_pending(self, batch_id: str) -> bool:
        with self._mutex:
            return self._db.execute("SELECT 1 FROM items WHERE batch_id = ? AND status = ? LIMIT 1",
                                    (batch_id, PENDING)).fetchone() is not None

    def record_result(self, batch_id: str, line: int, ok: bool, result: str) -> bool:
        """A pending line's outcome, with the batch's request_counts, in one transaction. False (and nothing
        changes) when the line is no longer pending or the batch no longer takes results."""
        with self._tx() as db:
            rec = self._load(db, batch_id)
            if rec.status not in (IN_PROGRESS, CANCELLING):
                return False
            n = db.execute("UPDATE items SET status = ?, result = ?, body = NULL WHERE batch_id = ? AND line = ? "
                           "AND status = ?", (DONE if ok else ITEM_FAILED, result, batch_id, line, PENDING)).rowcount
            if n != 1:
                return False
            if ok:
                rec.completed += 1
            else:
                rec.failed += 1
            self._save(db, rec)
        return True

    def close_batch(self, batch_id: str, status: str,
                    pending_error: Callable[[str, int], str] | None = None) -> BatchRecord:
        """Write the output and error files (input order) and move the batch to its final `status`
        (completed, cancelled, expired) in one transaction. With `pending_error` (custom_id, line -> error
        line), lines still pending become errors; otherwise they are dropped."""
        with self._mutex:
            rows = self._db.execute("SELECT line, custom_id, status, result FROM items WHERE batch_id = ? "
                                    "ORDER BY line", (batch_id,)).fetchall()
            owner = self._load(self._db, batch_id).owner  # the batch's files are its owner's
        late = [(line, pending_error(cid, line))
                for line, cid, st, _ in rows if st == PENDING] if pending_error else []
        late_by_line = dict(late)
        outputs = [r for _, _, st, r in rows if st == DONE]
        errs = [r if st == ITEM_FAILED else late_by_line[line] for line, _, st, r in rows
                if st == ITEM_FAILED or line in late_by_line]
        out_rec = self._write_lines(outputs, f"{batch_id}_output.jsonl", "batch_output", owner) if outputs else None
        err_rec = self._write_lines(errs, f"{batch_id}_errors.jsonl", "batch_output", owner) if errs else None
        with self._tx() as db:
            rec = self._load(db, batch_id)
            if rec.status in TERMINAL:  # closed already (its items are gone): these files are not its files
                for f in (out_rec, err_rec):
                    if f is not None:
                        self.file_path(f.id).unlink(missing_ok=True)
                return rec
            for f in (out_rec, err_rec):
                if f is not None:
                    self._insert_file(db, f)
            db.executemany("UPDATE items SET status = ?, result = ? WHERE batch_id = ? AND line = ?",
                           [(ITEM_FAILED, err, batch_id, line) for line, err in late])
            rec.failed += len(late)
            rec.output_file_id = out_rec.id if out_rec else None
            rec.error_file_id = err_rec.id if err_rec else None
            rec.status = status
            setattr(rec, f"{status}_at", int(time.time()))
            self._save(db, rec)
            db.execute("DELETE FROM items WHERE batch_id = ?", (batch_id,))  # its answers are in its files now
            # The input's lines are in the database since validation: only a batch still validating needs it.
            delete_input = rec.auto_delete_input_file and not db.execute(
                "SELECT 1 FROM batches WHERE status = ? AND input_file_id = ? LIMIT 1",
                (VALIDATING, rec.input_file_id)).fetchone()
        if delete_input:
            self.delete_file(rec.input_file_id)
        return rec


__all__ = ["DONE", "ITEM_FAILED", "PENDING", "Item", "Store", "default_data_dir"]
