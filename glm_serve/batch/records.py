"""The batch API's objects: file and batch records as stored and as the API shows them (the vendor's / OpenAI's
Batch and File objects, /work/shared/docs/api.md "Batch files"), batch statuses, and completion windows.

    validating -> in_progress -> finalizing -> completed
         |             |-> cancelling -> cancelled      (pending lines dropped, finished ones kept)
         |             '-> expired                      (completion_window passed; unfinished lines -> errors)
         '-> failed                                     (the input file is unusable)
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields

VALIDATING, FAILED, IN_PROGRESS, FINALIZING = "validating", "failed", "in_progress", "finalizing"
COMPLETED, EXPIRED, CANCELLING, CANCELLED = "completed", "expired", "cancelling", "cancelled"
ACTIVE = (VALIDATING, IN_PROGRESS, FINALIZING, CANCELLING)  # the worker still has work on these
TERMINAL = (FAILED, COMPLETED, EXPIRED, CANCELLED)

# Batch line urls (and batch endpoints) served: the vendor's own and OpenAI's spelling of chat completions. Each
# runs its route's schema (batch/runner.py): a /v1 line is an OpenAI chat body (do_sample, for one, is not read).
ENDPOINTS = ("/v4/chat/completions", "/v1/chat/completions")

_WINDOW = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


MAX_WINDOW_S = 365 * 86400  # a year: expiry times stay ordinary timestamps


def parse_window(text: str) -> int:
    """'24h' -> 86400 seconds. Accepts <n>s, <n>m, <n>h, <n>d with n >= 1, up to a year; ValueError otherwise."""
    m = _WINDOW.match(text) if isinstance(text, str) and len(text) <= 32 else None
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"completion_window must look like '24h' (a positive number of s, m, h or d), "
                         f"got {text!r}")
    seconds = int(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds > MAX_WINDOW_S:
        raise ValueError(f"completion_window must be at most 365d, got {text!r}")
    return seconds


@dataclass
class FileRecord:
    id: str
    filename: str
    purpose: str  # "batch" (uploads) or "batch_output" (a batch's output and error files)
    bytes: int
    created_at: int  # unix seconds
    owner: str | None = None  # API key id that made it (None: made with auth off); not shown by the API

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed", "status_details": None}


@dataclass
class BatchRecord:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str  # as the client sent it, e.g. "24h"
    created_at: int  # unix seconds, like every *_at
    expires_at: int  # created_at + the completion window
    status: str = VALIDATING
    metadata: dict | None = None
    auto_delete_input_file: bool = False  # delete the input file once the batch is over (the vendor SDK's flag)
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0  # request_counts: lines in the input (blank lines aside)
    completed: int = 0  # lines answered (in the output file)
    failed: int = 0  # lines in the error file (malformed, refused, failed, or expired)
    errors: list[dict] = field(default_factory=list)  # why a failed batch failed: [{code, message, line?}]
    owner: str | None = None  # API key id that made it (None: made with auth off); not shown by the API

    def to_row(self) -> dict:
        return asdict(self)

    @classmethod
    def from_row(cls, row: dict) -> BatchRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})

    def to_dict(self) -> dict:
        return {
            "id": self.id, "object": "batch", "endpoint": self.endpoint,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id, "completion_window": self.completion_window,
            "status": self.status, "output_file_id": self.output_file_id, "error_file_id": self.error_file_id,
            "created_at": self.created_at, "in_progress_at": self.in_progress_at, "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at, "completed_at": self.completed_at, "failed_at": self.failed_at,
            "expired_at": self.expired_at, "cancelling_at": self.cancelling_at, "cancelled_at": self.cancelled_at,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "metadata": self.metadata,
        }


def visible(owner: str | None, caller: str | None) -> bool:
    """Whether a file or batch made by key `owner` shows to key `caller`. Each key sees its own; a server with
    no keys (caller None) shows everything; what was made while the server had no keys (owner None) was
    everyone's then and stays so."""
    return caller is None or owner is None or owner == caller

