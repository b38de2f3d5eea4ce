"""System shared memory regions (Triton's extension): registered by key, read for inputs, written for outputs.

A client creates a POSIX shared memory object (`shm_open`, i.e. `/dev/shm/<key>`), registers
`byte_size` bytes of it from `offset` under a name, and then names the region, an offset in it and
a byte size instead of sending tensor bytes. Inputs are wrapped with `numpy.frombuffer` on the
mapping, without copying; outputs are written into it. Every offset and size is checked against the
region's bounds. Regions belong to this process (with several workers, to the worker that got the
register call).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from libs.errors import AlreadyExists, InvalidArgument

SHM_ROOT = Path("/dev/shm")


@dataclass(frozen=True)
class SharedMemoryRef:
    """Where a tensor lives: `byte_size` bytes at `offset` inside the registered region `region`."""

    region: str
    byte_size: int
    offset: int = 0


@dataclass(frozen=True)
class RegionStatus:
    """One registered region as the status calls report it."""

    name: str
    key: str
    offset: int
    byte_size: int


class _Region:
    __slots__ = ("byte_size", "key", "mapping", "name", "offset", "view")

    def __init__(self, name: str, key: str, offset: int, byte_size: int, mapping: mmap.mmap) -> None:
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self.mapping = mapping
        self.view = memoryview(mapping)[offset : offset + byte_size]

    def close(self) -> None:
        self.view.release()
        # Arrays of in-flight requests may still point into the mapping: then it is freed with them.
        with contextlib.suppress(BufferError):
            self.mapping.close()


def _key_path(key: str) -> Path:
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", ".."):
        raise InvalidArgument(
            f"key: '{key}' is not a shared memory key (expected '/name', as shm_open takes)"
        )
    return SHM_ROOT / name


class SharedMemoryRegistry:
    """The registered system shared memory regions of this process, by name."""

    def __init__(self) -> None:
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Maps `byte_size` bytes at `offset` of the shared memory object `key` under `name`.

        Raises:
            InvalidArgument: An empty name, a bad key, a key that does not exist, or bounds outside the
                object; the message names the field.
            AlreadyExists: A region of that name is registered already.
        """
        if not name:
            raise InvalidArgument("name: must not be empty")
        if byte_size <= 0:
            raise InvalidArgument(f"byte_size: must be > 0, got {byte_size}")
        if offset < 0:
            raise InvalidArgument(f"offset: must be >= 0, got {offset}")
        path = _key_path(key)
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(f"shared memory region '{name}' is already registered")
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                raise InvalidArgument(
                    f"key: no shared memory object '{key}' exists (create it with shm_open first)"
                ) from None
            except OSError as exc:
                raise InvalidArgument(
                    f"key: cannot open shared memory object '{key}': {exc.strerror}"
                ) from None
            try:
                size = os.fstat(fd).st_size
                if offset + byte_size > size:
                    raise InvalidArgument(
                        f"offset + byte_size: {offset} + {byte_size} exceeds the {size} bytes of "
                        f"shared memory object '{key}'"
                    )
                mapping = mmap.mmap(fd, offset + byte_size)
            finally:
                os.close(fd)
            self._regions[name] = _Region(name, key, offset, byte_size, mapping)

    def unregister(self, name: str = "") -> None:
        """Unregisters `name`, or every region when `name` is empty; an unknown name is not an error."""
        with self._lock:
            names = [name] if name else list(self._regions)
            for n in names:
                region = self._regions.pop(n, None)
                if region is not None:
                    region.close()

    def status(self, name: str = "") -> list[RegionStatus]:
        """The registered regions (or only `name`).

        Raises:
            InvalidArgument: `name` is given and not registered.
        """
        region = self._regions.get(name)
        if name and region is None:
            raise InvalidArgument(f"name: shared memory region '{name}' is not registered")
        chosen = [region] if region is not None else list(self._regions.values())
        return [RegionStatus(r.name, r.key, r.offset, r.byte_size) for r in chosen]

    def read(self, ref: SharedMemoryRef, what: str) -> memoryview:
        """The bytes a tensor names (no copy); `what` names the tensor in errors.

        Raises:
            InvalidArgument: Unknown region, or offset + size outside it.
        """
        region = self._regions.get(ref.region)
        if region is None:
            raise InvalidArgument(f"{what}: shared_memory_region '{ref.region}' is not registered")
        if ref.offset < 0 or ref.byte_size < 0:
            raise InvalidArgument(
                f"{what}: shared_memory_offset and shared_memory_byte_size must be >= 0, got "
                f"{ref.offset} and {ref.byte_size}"
            )
        if ref.offset + ref.byte_size > region.byte_size:
            raise InvalidArgument(
                f"{what}: shared_memory_offset + shared_memory_byte_size ({ref.offset} + {ref.byte_size}) "
                f"exceeds the {region.byte_size} bytes of shared memory region '{ref.region}'"
            )
        return region.view[ref.offset : ref.offset + ref.byte_size]

    def write(self, ref: SharedMemoryRef, data: np.ndarray | bytes, what: str) -> None:
        """Copies an output's bytes to the start of the slice `ref` names.

        Raises:
            InvalidArgument: Unknown region, bounds outside it, or an output larger than the given size.
        """
        target = self.read(ref, what)
        if isinstance(data, bytes):
            raw = np.frombuffer(data, np.uint8)
        else:
            raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        if raw.size > ref.byte_size:
            raise InvalidArgument(
                f"{what}: shared_memory_byte_size {ref.byte_size} is too small for the {raw.size} "
                "bytes of the result"
            )
        np.frombuffer(target, np.uint8, count=raw.size)[:] = raw

    def close(self) -> None:
        """Unregisters everything (server shutdown)."""
        self.unregister()
