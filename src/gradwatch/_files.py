"""Reading untrusted files safely: regular files only (never a pipe or a device), bounded lines,
records and total bytes."""

from __future__ import annotations

import os
import stat
from typing import Any, BinaryIO

__all__ = ["MAX_LINE_BYTES", "MAX_RECORD_BYTES", "MAX_TOTAL_BYTES", "ReadError"]

# An event is ~1 KB; an optimizer update carries one ratio per parameter (~100 KB for a model of
# a thousand parameter tensors). The summary record of a TensorBoard run holds every finding.
MAX_LINE_BYTES = 16 << 20
MAX_RECORD_BYTES = 64 << 20
MAX_TOTAL_BYTES = 4 << 30  # over all files of one report (`gradwatch report --max-bytes`)
_CHUNK = 1 << 20


class ReadError(Exception):
    """The path cannot be read at all: missing, not a valid path, not a directory or a regular
    file (a named pipe, a device), or a file that cannot be opened."""


class _Limits:
    """The bounds of one :func:`load_run`; ``left`` is what the byte budget still allows."""

    def __init__(self, max_line: int, max_record: int, max_total: int) -> None:
        for name, value in (("max_line_bytes", max_line), ("max_record_bytes", max_record),
                            ("max_total_bytes", max_total)):
            if type(value) is not int or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.max_line, self.max_record, self.total = max_line, max_record, max_total
        self.left = max_total


class _Bounded:
    """A regular file, read up to its size when opened and as far as the byte budget allows."""

    def __init__(self, f: BinaryIO, size: int, limits: _Limits) -> None:
        self.f, self.limits = f, limits
        self.left = min(size, limits.left)
        self.cut = size > limits.left  # the budget ends before the file does

    def read(self, n: int) -> bytes:
        return self._used(self.f.read(min(n, self.left)))

    def readline(self, n: int) -> bytes:
        return self._used(self.f.readline(min(n, self.left)))

    def skip(self, n: int) -> None:
        self.f.seek(self._used(min(n, self.left)), os.SEEK_CUR)

    def skip_line(self) -> None:
        """Skip past the next newline (or to the end), a chunk at a time into one buffer."""
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while self.left:
            n = self.f.readinto(view[: min(_CHUNK, self.left)])
            end = buf.find(b"\n", 0, n) + 1
            if not n or end:
                self.f.seek(end - n, os.SEEK_CUR)
                self._used(end)
                return
            self._used(n)

    def _used(self, data: Any) -> Any:
        n = data if isinstance(data, int) else len(data)
        self.left -= n
        self.limits.left -= n
        return data

    def note_budget(self, path: str, warnings: list[str]) -> None:
        """A warning when the byte budget cut this file short."""
        if self.cut and self.left == 0:
            warnings.append(f"{path}: stopped at the read limit of {self.limits.total} bytes "
                            "over all files; the rest is not read (counts are partial)")


_NOT_REGULAR = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                (stat.S_ISDIR, "a directory"))


def _what(mode: int) -> str:
    return next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")


def _stat(path: str) -> os.stat_result:
    try:
        return os.stat(path)
    except ValueError:  # an embedded NUL byte
        raise ReadError(f"{path!r} is not a valid path (it contains a NUL byte)") from None
    except FileNotFoundError:
        raise ReadError(f"{path!r} does not exist") from None
    except OSError as exc:
        raise ReadError(f"cannot access {path!r} ({exc.strerror or exc})") from None


_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
               | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def _open_regular(path: str) -> tuple[BinaryIO, int]:
    """Open ``path`` for reading if it is a regular file; return the file and its size. Never
    blocks: a named pipe is refused before opening, and opened without blocking if it replaced
    the file in between (then refused on its descriptor). Raises :class:`ReadError`."""
    st = _stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise ReadError(f"{path!r} is {_what(st.st_mode)}, not a regular file")
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except OSError as exc:
        raise ReadError(f"cannot open {path!r} ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ReadError(f"{path!r} is {_what(st.st_mode)}, not a regular file")
        return os.fdopen(fd, "rb"), st.st_size
    except BaseException:
        os.close(fd)
        raise


