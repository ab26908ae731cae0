"""Find where a JPEG ends, by walking its marker structure.

``jpeg_end(data)`` tells a complete JPEG (returns the offset just past its EOI
marker) from a truncated one (returns None), whatever follows the EOI: phones
append MP4 videos to "motion photos", some apps append other bytes.  Segment
lengths are followed, so an EXIF thumbnail (a whole JPEG inside APP1) is skipped,
and entropy-coded data is scanned with ``bytes.find``, so multi-megabyte files
take milliseconds.
"""
from __future__ import annotations

import re

_FILL = re.compile(rb"\xff+")  # a marker's 0xFF, with any fill bytes before it
_RST = range(0xD0, 0xD8)
_SOS, _EOI, _TEM = 0xDA, 0xD9, 0x01


def jpeg_end(data: bytes) -> int | None:
    """Offset just past the EOI that ends the JPEG in ``data``; None if truncated.

    Raises ValueError when ``data`` does not start with SOI, or when its marker
    structure is broken (a byte that is not a marker where one must be).
    """
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG: no SOI marker at offset 0")
    n, pos, in_scan = len(data), 2, False
    while True:
        if in_scan:  # entropy-coded data runs up to the next 0xFF
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
        if pos >= n:
            return None
        if data[pos] != 0xFF:
            raise ValueError(f"not a JPEG: no marker at offset {pos}")
        pos = _FILL.match(data, pos).end()
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            return pos
        if marker == _TEM or marker in _RST or (in_scan and marker == 0):
            continue  # standalone (RSTn stay inside the scan), or a stuffed 0xFF byte
        if marker in (0x00, 0xD8):
            raise ValueError(f"not a JPEG: bad marker 0xFF{marker:02X} at offset {pos - 1}")
        if pos + 2 > n:
            return None
        # a length of 0 or 1 lands on a length byte, not 0xFF: ValueError next turn;
        # one that runs past the end: None next turn
        pos += int.from_bytes(data[pos:pos + 2], "big")
        in_scan = marker == _SOS
