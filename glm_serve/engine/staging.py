"""Owns the upload of a step's host index arrays to the device: packed into one persistent (pinned) host buffer
and sent with one copy into a persistent device buffer, instead of one host allocation, one pinning copy and
one transfer per array (a decode step has about ten: input positions, slot mapping, sequence lengths and
starts, table rows, logits rows, new block-table entries).

    host arrays    a: int64 [B]     b: int32 [B + 1]     c: int64 [T]  ...
    staging slot   |a..........|pad|b.....|pad|c...............|      each at a 64-byte aligned offset
    device slot    |a..........|pad|b.....|pad|c...............|      <- one non-blocking copy
    returned       device[off:off + nbytes].view(dtype), one typed view per array

Aligned offsets keep the views as aligned as fresh allocations: Triton specialises kernels on a pointer's
16-byte alignment, so a misaligned view would compile another kernel version in the middle of serving.

Two slots are used in turn. With overlap scheduling, step N+1 is prepared while step N's copy may not have run
yet; N+1 writes the other slot, and each slot's copy records an event that the next write into that slot's
host buffer waits for (already passed in practice: that copy belonged to a step synced since). The device
side needs no wait: the next copy into a device slot is queued on the same stream after every kernel that
reads its previous contents.

On the CPU the arrays are where the model reads them already (torch.from_numpy shares their memory), so the
uploader hands them over as they are unless told to stage (`staged=True`: tests run the GPU's path that way).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

_ALIGN = 64  # bytes; see the module docstring
_MIN_BYTES = 64 << 10


class StepUploader:
    """`send([(array, dtype), ...])` -> the arrays on the device, as typed views of one persistent buffer."""

    def __init__(self, device: torch.device, staged: bool | None = None) -> None:
        self.device = device
        self.pin = device.type == "cuda"
        self.staged = self.pin if staged is None else staged
        self._slots: list[_Slot] = []
        self._next = 0
        self.num_uploads = 0

    def send(self, arrays: Sequence[tuple[np.ndarray, type]]) -> list[torch.Tensor]:
        """Copy each (host array, numpy dtype) to the device, converted to that dtype; one transfer in all.
        The returned tensors are valid for work queued before the upload after next (two slots in turn)."""
        self.num_uploads += 1
        if not self.staged:  # on the CPU: the arrays themselves (see the module docstring)
            return [torch.from_numpy(a.astype(dtype, copy=False)).to(self.device) for a, dtype in arrays]
        layout, end = [], 0
        for a, dtype in arrays:
            dtype = np.dtype(dtype)
            layout.append((end, a.size, dtype))
            end += -(-a.size * dtype.itemsize // _ALIGN) * _ALIGN
        slot = self._slot(max(end, _ALIGN))
        for (off, n, dtype), (a, _) in zip(layout, arrays):
            slot.host_np[off:off + n * dtype.itemsize].view(dtype)[:] = a.reshape(-1)  # converts as it writes
        slot.device[:end].copy_(slot.host[:end], non_blocking=self.pin)
        if slot.event is not None:
            slot.event.record()
        return [slot.device[off:off + n * dtype.itemsize].view(_TORCH[dtype]).view(a.shape)
                for (off, n, dtype), (a, _) in zip(layout, arrays)]

    def _slot(self, nbytes: int) -> _Slot:
        """The next slot, its host buffer free to write, holding at least nbytes (grown when short)."""
        if len(self._slots) < 2:
            self._slots.append(_Slot(max(_MIN_BYTES, nbytes), self.device, self.pin))
            return self._slots[-1]
        k, self._next = self._next, 1 - self._next
        slot = self._slots[k]
        if slot.event is not None:
            slot.event.synchronize()  # its last copy has run (see the module docstring)
        if slot.nbytes < nbytes:
            # The old buffers go back to torch's caching allocators, which keep them until work queued on them
            # is done.
            slot = self._slots[k] = _Slot(max(nbytes, 2 * slot.nbytes), self.device, self.pin)
        return slot


class _Slot:
    @torch.inference_mode(False)  # plain tensors: steps run in inference mode, tests and warm-up may not
    def __init__(self, nbytes: int, device: torch.device, pin: bool) -> None:
        self.nbytes = nbytes
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)  # [nbytes]
        self.host_np = self.host.numpy()  # the same memory, written with numpy
        self.device = torch.empty(nbytes, dtype=torch.uint8, device=device)  # [nbytes]
        self.event = torch.cuda.Event() if device.type == "cuda" else None


_TORCH = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}
