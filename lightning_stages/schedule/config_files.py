"""Reading a config file's text: UTF-8, at most :data:`MAX_BYTES` of it, from a file, a pipe or a device; whatever
goes wrong is a :class:`~lightning_stages.StageConfigError` naming the file."""

from __future__ import annotations

import codecs
import os
import stat
from pathlib import Path
from typing import BinaryIO

from lightning_stages.errors import StageConfigError, StageProblem

__all__ = ["MAX_BYTES", "read_text"]

#: the most bytes of a config file that are read (a longer one, or a stream that never ends, is refused)
MAX_BYTES = 1 << 28


def _error(message: str) -> StageConfigError:
    return StageConfigError(StageProblem(message))


def _too_large(path: Path) -> StageConfigError:
    return _error(f"{path}: larger than {MAX_BYTES >> 20} MiB, not a config file")


def _read_stream(handle: BinaryIO, path: Path) -> str:
    """A stream's text, decoded as it is read (a device that gives binary data, such as ``/dev/urandom``, is named
    as such at once; one that never ends, such as ``/dev/zero``, at the limit)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    size = 0
    while True:
        block = handle.read(1 << 20)
        size += len(block)
        if size > MAX_BYTES:
            raise _too_large(path)
        try:
            parts.append(decoder.decode(block, final=not block))
        except UnicodeDecodeError as err:  # err.object: the bytes held back from the last block, then this one
            byte, offset = err.object[err.start], size - len(err.object) + err.start
            raise _error(f"{path}: not a text file (not UTF-8: byte {byte:#04x} at offset {offset})") from None
        if not block:
            break
    return "".join(parts)


def read_text(path: Path) -> str:
    """The file's text (UTF-8), at most :data:`MAX_BYTES` bytes of it.

    Raises:
        StageConfigError: the file is missing or unreadable, is not UTF-8 text (e.g. a binary file), or is larger
            than :data:`MAX_BYTES` (e.g. ``/dev/zero``, which never ends).
    """
    try:
        with path.open("rb") as handle:
            if stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                data = handle.read(MAX_BYTES + 1)
                if len(data) > MAX_BYTES:
                    raise _too_large(path)
                return data.decode("utf-8")
            return _read_stream(handle, path)  # a pipe (``<(...)``) or a device: until its end, the limit or a non-text byte
    except OSError as err:
        raise _error(f"cannot read config file {str(path)!r}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        byte = err.object[err.start]
        raise _error(f"{path}: not a text file (not UTF-8: byte {byte:#04x} at offset {err.start})") from None
    except MemoryError:
        raise _error(f"{path}: too large to read into memory") from None
