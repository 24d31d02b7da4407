"""Byte sizes as people write them: ``30gb``, ``512MB``, ``1.5tb``, ``64kb`` or plain bytes."""

from __future__ import annotations

import re
from fractions import Fraction

# Binary units: a "gb" of pool is 2**30 bytes, as the page and pinning sizes it is compared with.
_UNITS = {"": 1, "b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30, "tb": 1 << 40,
          "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$")


def parse_size(text: str | int) -> int:
    """Bytes of ``text``: ``"30gb"``, ``"512MB"``, ``"1.5tb"``, ``"64kb"``, ``"1234"`` or an int.

    Units are binary (``kb`` = 1024). Anything else, a negative number, or a fraction of a
    byte in plain bytes is a ``ValueError`` naming the text.
    """
    if isinstance(text, bool):
        raise ValueError(f"size {text!r} is not a size")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text!r} is negative")
        return text
    if not isinstance(text, str):
        raise ValueError(f"size {text!r} is not a string or an int")
    match = _PATTERN.match(text.lower())
    if match is None or match.group(2) not in _UNITS:
        raise ValueError(f"size {text!r} is not a size (examples: 30gb, 512MB, 1.5tb, 64kb, 1234)")
    number, unit = match.groups()
    scale = _UNITS[unit]
    # Exact arithmetic: 1.5tb is 1.5 * 2**40 bytes, no float rounding on large pools.
    value = Fraction(number) * scale
    if scale == 1 and value.denominator != 1:
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(value)  # a fraction of a byte of a larger unit (1.1gb) rounds down
