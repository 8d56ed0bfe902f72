"""Reading the files a config or a command names (trust anchors, presets, keys): bounded in size."""

from __future__ import annotations

import os

#: Larger than any certificate bundle, CRL set or preset a config should name.
MAX_FILE_BYTES = 4 * 1024 * 1024


class FileReadError(ValueError):
    """A file that cannot be used: unreadable, or larger than the limit. The message names the
    problem, not the content."""


def read_limited(path: str | os.PathLike, limit: int = MAX_FILE_BYTES) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as exc:
        raise FileReadError(f"cannot read: {exc.strerror or exc}") from None
    except ValueError:  # a path with a NUL byte, or characters the file system cannot encode
        raise FileReadError("cannot read: not a usable file name") from None
    if len(data) > limit:
        raise FileReadError(f"larger than {limit} bytes")
    return data
