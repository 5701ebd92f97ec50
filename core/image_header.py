"""An image's width and height from its header, without decoding it.

A 420 KB PNG can hold 12000x12000 pixels: ~2-5 s and ~1 GB to decode. The front end
(which never loads Pillow) reads the size from the first bytes and refuses oversized
images before they are queued, let alone copied to a second worker by a hedge. JPEG
and PNG only; for other formats the worker checks with Pillow before it decodes.
"""

from __future__ import annotations

import struct

_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # frame headers (not DHT, JPG, DAC)


def dimensions(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height), or None when the format is not JPEG or PNG, or the header is cut."""
    b = bytes(data[:32]) if len(data) >= 24 else bytes(data)
    if b.startswith(b"\x89PNG\r\n\x1a\n") and len(b) >= 24 and b[12:16] == b"IHDR":
        return struct.unpack(">II", b[16:24])
    if b.startswith(b"\xff\xd8"):
        return _jpeg(memoryview(data))
    return None


def _jpeg(m: memoryview) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(m):
        if m[i] != 0xFF:
            return None
        marker = m[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        length = (m[i + 2] << 8) | m[i + 3]
        if marker in _SOF:
            h, w = (m[i + 5] << 8) | m[i + 6], (m[i + 7] << 8) | m[i + 8]
            return w, h
        if marker == 0xDA or length < 2:  # scan data before any frame header: give up
            return None
        i += 2 + length
    return None
