"""Length-prefixed frames: the same-host lane's wire format.

One frame is a 4-byte big-endian length and that many bytes (a pickle). Pickles cross
only a Unix socket in a directory of this user's (``lane_dir``): whoever can connect
could run the worker anyway.
"""

from __future__ import annotations

import os
import stat
import struct
import tempfile
from pathlib import Path

HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 31  # a batch of tensors in the frame itself, when they are not in shared memory


def frame(data: bytes) -> bytes:
    if len(data) >= MAX_FRAME:
        raise ValueError(f"a {len(data)}-byte frame is over the lane's limit")
    return HEADER.pack(len(data)) + data


def split_frames(buffer: bytearray) -> list[bytes]:
    """The whole frames at the start of ``buffer``, taken out of it; a partial one stays."""
    frames, at = [], 0
    while len(buffer) - at >= HEADER.size:
        (n,) = HEADER.unpack_from(buffer, at)
        if len(buffer) - at - HEADER.size < n:
            break
        frames.append(bytes(buffer[at + HEADER.size : at + HEADER.size + n]))
        at += HEADER.size + n
    del buffer[:at]
    return frames


def lane_dir() -> Path:
    """This user's directory for lane sockets, made 0700; refused (OSError) if someone
    else owns it or can enter it, so nobody else can reach a socket in it."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    d = Path(base) / f"batch-router-{os.getuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(f"{d} is not a private directory of this user's (mode {st.st_mode & 0o777:o}, uid {st.st_uid})")
    return d
