"""System shared memory for clients on the server's host (tritonclient.utils.shared_memory).

A request's input tensors are copied into a POSIX shared-memory region the server has
registered, instead of being serialised into the gRPC message: Triton reads them in place.
One region per client thread (requests on a thread are sequential, so the region is never
overwritten while the server reads it); a region grows (re-created, re-registered) when a
request needs more room. Outputs still come back over gRPC: their size is not known before the
call (one 256x256 FP16 mask per cell) and they are small next to the input images.

Only for a server on the same host (same /dev/shm); the server must not lock its
``shared-memory`` protocol behind an admin key.
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid

import numpy as np

ALIGN = 64
MIN_REGION_BYTES = 1 << 20
_COUNTER = itertools.count()
_COUNTER_LOCK = threading.Lock()


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def region_bytes(needed: int) -> int:
    """Region size for ``needed`` bytes: the next power of two, at least 1 MiB."""
    return max(MIN_REGION_BYTES, 1 << max(0, int(needed) - 1).bit_length())


class ShmInputs:
    """One thread's input region on one server, driven through that thread's gRPC ``client``."""

    def __init__(self, client, triton_dtypes: dict[np.dtype, str]) -> None:
        self.client = client
        self._dtypes = triton_dtypes
        self.name: str | None = None
        self.handle = None
        self.size = 0

    def _open(self, size: int) -> None:
        import tritonclient.utils.shared_memory as shm

        self.close()
        with _COUNTER_LOCK:
            serial = next(_COUNTER)
        self.name = f"cellsam-{os.getpid()}-{serial}-{uuid.uuid4().hex[:8]}"
        key = f"/{self.name}"
        self.handle = shm.create_shared_memory_region(self.name, key, size, create_only=True)
        self.size = size
        try:
            self.client.register_system_shared_memory(self.name, key, size)
        except BaseException:
            shm.destroy_shared_memory_region(self.handle)
            self.name, self.handle, self.size = None, None, 0
            raise

    def inputs(self, arrays: dict[str, np.ndarray]) -> list:
        """InferInputs pointing into the region, which now holds ``arrays`` (C-contiguous copies)."""
        import tritonclient.utils.shared_memory as shm
        from tritonclient.grpc import InferInput

        arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        needed = sum(_aligned(a.nbytes) for a in arrays.values())
        if needed > self.size:
            self._open(region_bytes(needed))
        inputs, offset = [], 0
        for name, array in arrays.items():
            dtype = self._dtypes.get(array.dtype)
            if dtype is None:
                raise ValueError(f"input {name!r} has unsupported dtype {array.dtype}")
            if array.nbytes:
                shm.set_shared_memory_region(self.handle, [array], offset=offset)
            infer_input = InferInput(name, list(array.shape), dtype)
            infer_input.set_shared_memory(self.name, array.nbytes, offset)
            inputs.append(infer_input)
            offset += _aligned(array.nbytes)
        return inputs

    def reset(self) -> None:
        """Forget the region (e.g. the server restarted and lost its registration)."""
        self.close(unregister=False)

    def close(self, unregister: bool = True) -> None:
        """Unregister the region from the server (best effort) and free it."""
        import tritonclient.utils.shared_memory as shm

        if self.handle is None:
            return
        if unregister:
            try:
                self.client.unregister_system_shared_memory(self.name)
            except Exception:  # server gone: nothing left to unregister
                pass
        try:
            shm.destroy_shared_memory_region(self.handle)
        finally:
            self.name, self.handle, self.size = None, None, 0
