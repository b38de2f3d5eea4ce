"""The durable spool: an append-only, crash-safe folder of segment files holding Kafka messages.

The inference-log producer (`libs/inference_log.py`) writes every record here before the prediction it
describes is answered, and deletes a segment once Kafka acknowledged all its records; readers (a restart's
re-send, the quarantine) read it back.

Spool format: a folder of append-only segment files `segment-<seq>.spool`, each
a sequence of frames `MAGIC(4) | length(u32 LE) | crc32(length bytes + payload)(u32 LE) | payload`.
The payload is the Kafka message: key, headers and value. A process only ever
appends to a segment it created; segments left by an earlier process are only
read. A torn tail (a crash in the middle of a write) or a damaged frame fails its
length or checksum test and is skipped: the reader scans forward to the next
MAGIC that starts a valid frame, so one bad frame never hides the ones after it.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import logging
import os
import struct
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

MAGIC = b"IGS1"
_FRAME = struct.Struct("<4sII")
_LENGTH = struct.Struct("<I")
_MESSAGE_HEAD = struct.Struct("<IH")
_HEADER_HEAD = struct.Struct("<HI")
MAX_FRAME_BYTES = 64 * 1024 * 1024
_SEGMENT_GLOB = "segment-*.spool"
QUARANTINE_FILE = "quarantine.spool"
FSYNC_POLICIES = ("always", "interval", "never")

# Kafka record headers as confluent-kafka takes and gives them.
Headers = list[tuple[str, str | bytes | None]]


class SpooledMessage(NamedTuple):
    """One Kafka message as kept in the spool (a tuple: what the producer hands to Kafka, in this order)."""

    key: bytes
    value: bytes
    headers: Headers


def encode_message(key: bytes, value: bytes, headers: Sequence[tuple[str, str | bytes | None]]) -> bytes:
    """The spool payload of a message: key length, header count, key, headers, value."""
    parts = [_MESSAGE_HEAD.pack(len(key), len(headers)), key]
    for name, raw in headers:
        name_bytes = name.encode()
        data = raw.encode() if isinstance(raw, str) else raw or b""
        parts += (_HEADER_HEAD.pack(len(name_bytes), len(data)), name_bytes, data)
    parts.append(value)
    return b"".join(parts)


def decode_message(payload: bytes) -> SpooledMessage:
    """The inverse of `encode_message`; raises ValueError when the payload is malformed."""
    try:
        key_len, count = _MESSAGE_HEAD.unpack_from(payload, 0)
        pos = _MESSAGE_HEAD.size
        key = payload[pos : pos + key_len]
        pos += key_len
        headers: Headers = []
        for _ in range(count):
            name_len, data_len = _HEADER_HEAD.unpack_from(payload, pos)
            pos += _HEADER_HEAD.size
            name = payload[pos : pos + name_len].decode()
            pos += name_len
            headers.append((name, payload[pos : pos + data_len]))
            pos += data_len
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed spooled message: {exc}") from None
    if pos > len(payload):
        raise ValueError("malformed spooled message: truncated")
    return SpooledMessage(key=key, value=payload[pos:], headers=headers)


def frame(payload: bytes) -> bytes:
    """One spool frame: MAGIC, length, crc32 over length and payload, payload."""
    length = _LENGTH.pack(len(payload))
    return MAGIC + length + _LENGTH.pack(zlib.crc32(payload, zlib.crc32(length))) + payload


@dataclass
class ReadReport:
    """What reading a segment found besides the good frames."""

    frames: int = 0
    skipped_bytes: int = 0


def frame_at(data: bytes, pos: int) -> bytes | None:
    """The payload of the intact frame starting at `pos`, else None."""
    end = len(data)
    if end - pos < _FRAME.size:
        return None
    magic, length, crc = _FRAME.unpack_from(data, pos)
    start = pos + _FRAME.size
    if (
        magic == MAGIC
        and length <= MAX_FRAME_BYTES
        and start + length <= end
        and zlib.crc32(data[start : start + length], zlib.crc32(data[pos + 4 : pos + 8])) == crc
    ):
        return data[start : start + length]
    return None


def iter_frames(data: bytes, report: ReadReport | None = None) -> Iterator[tuple[int, bytes]]:
    """Yields (offset, payload) of every intact frame in `data`, skipping torn or damaged ones.

    A frame is intact when its MAGIC, length and checksum agree; otherwise the
    reader moves to the next MAGIC and tries again there.
    """
    report = report if report is not None else ReadReport()
    pos = 0
    end = len(data)
    while pos < end:
        payload = frame_at(data, pos)
        if payload is not None:
            report.frames += 1
            yield pos, payload
            pos += _FRAME.size + len(payload)
            continue
        following = data.find(MAGIC, pos + 1)
        following = end if following < 0 else following
        report.skipped_bytes += following - pos
        pos = following


def read_frames(data: bytes, report: ReadReport | None = None) -> Iterator[bytes]:
    """Yields the payload of every intact frame in `data` (see `iter_frames`)."""
    return (payload for _, payload in iter_frames(data, report))


class SpoolLockedError(RuntimeError):
    """Another live process holds the spool folder."""


@dataclass(slots=True, eq=False)
class SegmentState:
    """What this process knows of one segment: records written, acknowledged by Kafka, to be re-sent.

    A segment is done (and deleted) when it is sealed, its records are known and Kafka acknowledged
    each of them once. Counters change under the producer's lock.
    """

    path: Path
    # False for an earlier process's segment until it has been read (its records are unknown).
    loaded: bool = True
    sealed: bool = False
    written: int = 0
    acked: int = 0
    # Offsets of records to re-send (refused or not delivered).
    failed: list[int] = field(default_factory=list)
    # Offsets of records refused for good in a batch: re-sent alone before they are quarantined.
    alone: list[int] = field(default_factory=list)
    opened: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> bool:
        return self.sealed and self.loaded and self.acked >= self.written


class Spool:
    """An append-only, crash-safe folder of segment files holding Kafka messages (format: module docstring)."""

    def __init__(
        self, directory: Path, *, fsync: str = "interval", segment_bytes: int = 64 * 1024 * 1024
    ) -> None:
        """Opens (creating) `directory` and locks it for this process.

        Raises:
            SpoolLockedError: another process uses the folder.
        """
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy must be one of {FSYNC_POLICIES}, got {fsync!r}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._segment_bytes = segment_bytes
        self._lock = threading.Lock()
        self._quarantine_lock = threading.Lock()
        self._lock_file = (self.directory / "LOCK").open("a")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise SpoolLockedError(f"spool {self.directory} is in use by another process") from None
        existing = self._segments()
        self._next_seq = (int(existing[-1].stem.split("-")[1]) + 1) if existing else 1
        # Every segment on disk, oldest first; earlier processes' ones are sealed and not yet loaded.
        self._states: dict[Path, SegmentState] = {
            path: SegmentState(path, loaded=False, sealed=True) for path in existing
        }
        self._active: SegmentState | None = None
        self._fd: int | None = None
        self._active_size = 0
        self._dirty = False
        self._dir_dirty = False

    def _segments(self) -> list[Path]:
        return sorted(self.directory.glob(_SEGMENT_GLOB))

    def append(self, key: bytes, value: bytes, headers: Sequence[tuple[str, str | bytes | None]]) -> None:
        """Appends one message; raises OSError (e.g. ENOSPC) when it cannot be written."""
        self.append_payloads([encode_message(key, value, headers)])

    def append_payloads(self, payloads: Sequence[bytes]) -> tuple[SegmentState, list[int]]:
        """Appends encoded messages with one write() (group commit); returns their segment and offsets.

        Once this returns, the messages survive the death of this process; with the "always" policy
        they were fsynced too.

        Raises:
            OSError: they could not be written (e.g. ENOSPC); none of them is in the spool.
        """
        frames = [frame(p) for p in payloads]
        data = b"".join(frames) if len(frames) > 1 else frames[0]
        old_fd: int | None = None
        with self._lock:
            if self._fd is None or self._active_size >= self._segment_bytes:
                old_fd = self._detach_locked()
                self._open_segment_locked()
            assert self._fd is not None and self._active is not None
            start = self._active_size
            try:
                _write_all(self._fd, data)
            except OSError:
                # Cut a partial frame so the next append starts clean (the reader would skip it anyway).
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, start)
                raise
            finally:
                if old_fd is not None:
                    _close_durably(old_fd)
            self._active_size = start + len(data)
            state = self._active
            state.written += len(frames)
            if self._fsync == "always":
                os.fsync(self._fd)
            else:
                self._dirty = True
        return state, list(itertools.accumulate((len(f) for f in frames[:-1]), initial=start))

    def _open_segment_locked(self) -> None:
        path = self.directory / f"segment-{self._next_seq:012d}.spool"
        self._next_seq += 1
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._active = self._states[path] = SegmentState(path)
        self._active_size = 0
        if self._fsync == "always":
            fsync_path(self.directory)
        else:  # the background sync makes the new name durable; a process crash does not need it
            self._dir_dirty = True

    def _detach_locked(self) -> int | None:
        """Seals the active segment; returns its descriptor for the caller to fsync and close."""
        fd = self._fd
        if self._active is not None:
            self._active.sealed = True
        self._fd = None
        self._active = None
        self._active_size = 0
        self._dirty = False
        return fd

    def sync(self) -> None:
        """Makes every appended message durable (the "interval" policy's periodic call).

        The fsync runs on a duplicate descriptor outside the lock, so appends from the request path
        never wait for the disk.
        """
        with self._lock:
            dir_dirty, self._dir_dirty = self._dir_dirty, False
            fd = os.dup(self._fd) if self._fd is not None and self._dirty else None
            self._dirty = False
        if dir_dirty:
            fsync_path(self.directory)
        if fd is not None:
            _close_durably(fd)

    def seal(self) -> None:
        """Closes the active segment so it can be re-sent or deleted; the next append starts a new one."""
        with self._lock:
            fd = self._detach_locked()
        if fd is not None:
            _close_durably(fd)

    def roll(self, older_than_s: float) -> None:
        """Seals the active segment when it was opened more than `older_than_s` seconds ago."""
        active = self._active
        if active is not None and time.monotonic() - active.opened >= older_than_s:
            with self._lock:
                fd = self._detach_locked() if self._active is active else None
            if fd is not None:
                _close_durably(fd)

    def states(self) -> list[SegmentState]:
        """Every segment's state, oldest first."""
        with self._lock:
            return list(self._states.values())

    def has_messages(self) -> bool:
        """True when any segment holds data."""
        with self._lock:
            active = self._active.path if self._active is not None else None
            return self._active_size > 0 or any(p != active for p in self._segments())

    def read(self, segment: Path, report: ReadReport | None = None) -> Iterator[SpooledMessage]:
        """The intact messages of a sealed segment, in order."""
        for payload in read_frames(segment.read_bytes(), report):
            try:
                yield decode_message(payload)
            except ValueError as exc:  # checksum matched but content is not ours: skip it
                log.error("spool %s: skipping a frame: %s", segment, exc)

    def quarantine(self, payload: bytes) -> Path:
        """Appends one encoded message to the quarantine file (fsynced; never re-sent); returns the file.

        Raises:
            OSError: it could not be written.
        """
        path = self.directory / QUARANTINE_FILE
        with self._quarantine_lock:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                _write_all(fd, frame(payload))
            finally:
                _close_durably(fd)
        return path

    def quarantined(self) -> Iterator[SpooledMessage]:
        """The messages in the quarantine file, oldest first (for operators and tests)."""
        path = self.directory / QUARANTINE_FILE
        if path.exists():
            for payload in read_frames(path.read_bytes()):
                yield decode_message(payload)

    def remove(self, segment: Path) -> None:
        """Deletes a segment whose messages were all delivered."""
        segment.unlink(missing_ok=True)
        with self._lock:
            self._states.pop(segment, None)
        fsync_path(self.directory)

    def size_bytes(self) -> int:
        """Bytes in all segments."""
        total = 0
        for path in self._segments():
            with contextlib.suppress(FileNotFoundError):
                total += path.stat().st_size
        return total

    def close(self) -> None:
        """Seals the active segment (fsync) and releases the folder."""
        self.seal()
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        self._lock_file.close()


def _close_durably(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def fsync_path(path: Path) -> None:
    """fsync of a file, or of a folder (its entries: a file created or renamed in it)."""
    _close_durably(os.open(path, os.O_RDONLY))
