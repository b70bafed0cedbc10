"""Seeds derived from names, identical in every process (unlike Python's ``hash``)."""

from __future__ import annotations

import hashlib
import json


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from ``parts`` (same parts, same seed, in every process)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
