"""The in-server batch worker: moves every batch along its states (records.py) on the server's event loop.

One loop, woken by new batches, cancels and finished lines (and every `poll_s` for expiry):
validate `validating` batches in the background -> close `cancelling` ones -> expire overdue ones -> finalize
`in_progress` ones with nothing pending or running -> fill free slots with pending lines, oldest batch first,
input order. Each line runs as its own task and records its result in its own transaction; cancelling the
task (cancel, expiry, shutdown) aborts its engine request and leaves the line pending.

Priority: batch lines go to the engine below interactive traffic. At most `concurrency` sequences are in
flight (a line asking for n choices counts n; capped at half of the engine's max_num_seqs, so chats always find
running slots), and only a quarter of that while any interactive request is in flight: a running batch adds a
few sequences to the engine's batch rather than a queue that chats would wait behind. A line whose n alone
exceeds the share runs by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from glm_serve.api.context import ServingContext
from glm_serve.batch.records import (
    CANCELLED,
    CANCELLING,
    COMPLETED,
    EXPIRED,
    FINALIZING,
    IN_PROGRESS,
    VALIDATING,
    BatchRecord,
)
from glm_serve.batch.runner import check_input, error_line, run_line
from glm_serve.batch.store import Item, Store

log = logging.getLogger(__name__)

MAX_VALIDATION_ATTEMPTS = 3  # a batch whose validation raises this many times fails instead of being retried
# A line that was in flight at this many crashes is not run again (an error line instead): if it is what crashes
# the process (a GPU fault, the kernel's OOM killer), re-running it at every start would keep the server down.
MAX_LINE_CRASHES = 3


@dataclass
class _Running:
    task: asyncio.Task | None = field(default=None, repr=False)
    recording: bool = False  # the answer is being recorded: let it finish even when its batch closes
    seqs: int = 1  # engine sequences the line runs (its n)


def _num_seqs(body: dict) -> int:
    """The sequences a checked line runs in the engine: its n (validated: an int in [1, max_n], or absent)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _checked_rows(ctx: ServingContext, data: bytes) -> tuple[list[tuple[int, str, str]], list[tuple]]:
    """An input file checked (check_input), as Store.start_batch takes it: (line, custom_id, body JSON, url) to run
    and (line, custom_id, error line). Called in a worker thread: encoding the bodies of a large input takes
    seconds (about one per 80 MB), which on the event loop would stall every chat."""
    items, bad = [], []
    for x in check_input(ctx, data):  # each line's parsed body is dropped once encoded
        if x.ok:
            items.append((x.line, x.custom_id, json.dumps(x.body, ensure_ascii=False), x.url))
        else:
            bad.append((x.line, x.custom_id, x.error))
    return items, bad


class BatchWorker:
    def __init__(self, store: Store, ctx: ServingContext, concurrency: int = 32, poll_s: float = 1.0):
        if concurrency < 1:
            raise ValueError(f"batch concurrency must be >= 1, got {concurrency}")
        self.store, self.ctx, self.poll_s = store, ctx, poll_s
        self.concurrency = max(1, min(concurrency, ctx.core.config.max_num_seqs // 2))
        self.busy_concurrency = max(1, self.concurrency // 4)  # while interactive requests are in flight
        self.peak_in_flight = 0  # most lines in flight at once so far
        self._running: dict[tuple[str, int], _Running] = {}  # (batch id, line) -> its task
        self._validating: dict[str, asyncio.Task] = {}  # batch id -> its validation
        self._validation_failures: dict[str, int] = {}  # batch id -> validations that raised so far
        self._wake: asyncio.Event | None = None
        self._main: asyncio.Task | None = None

    # ---- lifecycle (on the event loop) -------------------------------------------------------------------

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._main = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        """Stop the loop and every line in flight; those lines stay pending for the next start."""
        tasks = [t for t in (self._main, *self._validating.values(), *(r.task for r in self._running.values()))
                 if t is not None]
        # (batch id, line): a clean stop, not a crash (see MAX_LINE_CRASHES), unless the engine died under them
        stopped = list(self._running) if self.ctx.engine.alive else []
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._main = None
        await asyncio.to_thread(self.store.stop_items, stopped)  # lines answered meanwhile are left as they are

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def seqs_in_flight(self) -> int:
        """Engine sequences of the lines in flight (a line with n choices runs n)."""
        return sum(r.seqs for r in self._running.values())

    def limit(self) -> int:
        """Sequences allowed in flight now: fewer while interactive requests hold admission slots."""
        return self.busy_concurrency if self.ctx.admission.in_flight > 0 else self.concurrency

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 (a bug must not stop every batch for good; retry next poll)
                log.exception("batch worker step failed")
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass

    # ---- one pass ----------------------------------------------------------------------------------------

    async def tick(self) -> None:
        now = time.time()
        for b in await asyncio.to_thread(self.store.active_batches):
            answered = b.status == IN_PROGRESS and not self._busy(b.id) and \
                not await asyncio.to_thread(self.store.has_pending, b.id)
            if answered:  # every line is answered: completed, even if its window passed before this pass came
                await asyncio.to_thread(self.store.set_status, b.id, FINALIZING, (IN_PROGRESS,))
                rec = await asyncio.to_thread(self.store.close_batch, b.id, COMPLETED)
                log.info("batch %s completed: %d answered, %d failed", b.id, rec.completed, rec.failed)
            elif b.status in (VALIDATING, IN_PROGRESS) and now >= b.expires_at and b.id not in self._validating:
                await self._close(b, EXPIRED)
            elif b.status == VALIDATING:
                if b.id not in self._validating:
                    self._validating[b.id] = asyncio.ensure_future(self._validate(b))
            elif b.status == CANCELLING:
                if b.id not in self._validating:  # a validation in flight sees the cancel and stops first
                    await self._close(b, CANCELLED)
            elif b.status == FINALIZING:
                await asyncio.to_thread(self.store.close_batch, b.id, COMPLETED)
        await self._fill()

    def _busy(self, batch_id: str) -> bool:
        return any(bid == batch_id for bid, _ in self._running)

    async def _fill(self) -> None:
        free = self.limit() - self.seqs_in_flight  # in sequences: a line with n choices takes n
        if free <= 0 or not self.ctx.engine.alive:  # a stopped engine: the lines wait for the next start
            return
        now = time.time()
        for b in await asyncio.to_thread(self.store.active_batches):
            if b.status != IN_PROGRESS or now >= b.expires_at:
                continue
            skip = {line for bid, line in self._running if bid == b.id}
            start: list[tuple[Item, int]] = []
            blocked = False
            for item in await asyncio.to_thread(self.store.pending_items, b.id, free, skip):
                if item.starts >= MAX_LINE_CRASHES:
                    await asyncio.to_thread(self.store.record_result, b.id, item.line, False, error_line(
                        item.custom_id, item.line, "500", f"the server stopped {item.starts} times while answering "
                        "this line (a crash or kill each time); it is not run again", 500))
                    continue
                seqs = _num_seqs(item.body)
                if seqs > free and (self._running or start):
                    blocked = True  # input order: the next line waits until its sequences fit (alone, if it must)
                    break
                start.append((item, seqs))
                free -= seqs
                if free <= 0:
                    break
            if start:  # counted on disk before they reach the engine: a crash from here on is on their record
                lines = [item.line for item, _ in start]
                try:
                    await asyncio.to_thread(self.store.begin_items, b.id, lines)
                except asyncio.CancelledError:  # stop() while counting: these never ran
                    await asyncio.to_thread(self.store.stop_items, [(b.id, line) for line in lines])
                    raise
                for item, seqs in start:
                    self._start(item, seqs, b.owner)
            if blocked or free <= 0:
                return

    def _start(self, item: Item, seqs: int = 1, owner: str | None = None) -> None:
        entry = _Running(seqs=seqs)
        self._running[(item.batch_id, item.line)] = entry
        entry.task = asyncio.ensure_future(self._run_item(item, entry, owner))
        self.peak_in_flight = max(self.peak_in_flight, len(self._running))

    async def _run_item(self, item: Item, entry: _Running, owner: str | None = None) -> None:
        try:
            ok, text, _ = await run_line(self.ctx, item.custom_id, item.line, item.body, item.url, owner=owner)
            if not ok and not self.ctx.engine.alive:  # failed because the engine stopped, not for the line itself:
                # pending, to rerun; its start still counts, as at a crash of the whole server: the engine process's
                # death (a GPU fault, the OOM killer) may be this line's doing (MAX_LINE_CRASHES)
                return
            entry.recording = True
            await asyncio.to_thread(self.store.record_result, item.batch_id, item.line, ok, text)
        finally:
            self._running.pop((item.batch_id, item.line), None)
            self.wake()

    async def _validate(self, b: BatchRecord) -> None:
        retry_later = False
        try:
            errors = None
            if await asyncio.to_thread(self.store.get_file, b.input_file_id) is None:
                errors = [{"code": "1214", "message": f"input file {b.input_file_id} was deleted before the "
                                                      "batch started", "param": "input_file_id", "line": None}]
            else:
                data = await asyncio.to_thread(self.store.file_path(b.input_file_id).read_bytes)
                try:
                    items, bad = await asyncio.to_thread(_checked_rows, self.ctx, data)
                except ValueError as e:
                    errors = [{"code": "1214", "message": str(e), "param": "input_file_id", "line": None}]
            if errors is not None:
                await asyncio.to_thread(self.store.fail_batch, b.id, errors)
                log.info("batch %s failed: %s", b.id, errors[0]["message"])
                return
            if await asyncio.to_thread(self.store.start_batch, b.id, items, bad):
                log.info("batch %s: %d lines to run, %d malformed", b.id, len(items), len(bad))
        except Exception as e:  # noqa: BLE001 (stays validating: retried on a later pass, a few times)
            log.exception("validating batch %s failed", b.id)
            failures = self._validation_failures[b.id] = self._validation_failures.get(b.id, 0) + 1
            retry_later = failures < MAX_VALIDATION_ATTEMPTS
            if not retry_later:  # not a passing fault: fail the batch rather than spin on it
                await asyncio.to_thread(self.store.fail_batch, b.id, [{
                    "code": "500", "message": f"internal error while validating the input: {type(e).__name__}",
                    "param": "input_file_id", "line": None}])
        finally:
            self._validating.pop(b.id, None)
            if not retry_later:  # a retry waits for the next pass (no wake: that would retry at once)
                self._validation_failures.pop(b.id, None)
                self.wake()

    async def _close(self, b: BatchRecord, status: str) -> None:
        """Cancel the batch's lines in flight (their lines stay pending), then write its files and close it."""
        mine = [r for (bid, _), r in self._running.items() if bid == b.id]
        for r in mine:
            if not r.recording:
                r.task.cancel()
        await asyncio.gather(*(r.task for r in mine), return_exceptions=True)

        def expired(custom_id: str, line: int) -> str:
            return error_line(custom_id, line, "batch_expired", f"the batch's completion_window "
                                                                f"({b.completion_window}) passed before this line ran")

        rec = await asyncio.to_thread(self.store.close_batch, b.id, status, expired if status == EXPIRED else None)
        log.info("batch %s %s: %d answered, %d failed, of %d", b.id, status, rec.completed, rec.failed, rec.total)
