"""An attacker's view of what an artifact left behind: every object in the store and every
message on the bus, searched for one site's contribution.

Importable as `from leaks import ...` (tests/ is on sys.path). The search is what someone
holding only that view would do: read every number (JSON numbers, and hex strings as
integers), and try each, and each difference of two modulo the masking ring, against the
contribution in plain, and in the exact fixed point that masking uses.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flotta_mqtt.analytics import masking

HEX = re.compile(r"^[0-9a-f]+$")
# A small product travels inline, in its Resource's URL: read it as the product it is.
INLINE = re.compile(rb"data:[\w/.+-]*;base64,([A-Za-z0-9+/=]+)")


def numbers_in(value: Any) -> Iterator[int | float]:
    """Every number a JSON document holds, hex strings read as integers."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, str) and HEX.match(value):
        yield int(value, 16)
    elif isinstance(value, list):
        for item in value:
            yield from numbers_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from numbers_in(item)


def parsed(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


def store_objects(root: Path, artifact_id: str) -> dict[str, bytes]:
    """Every object a local store holds for an artifact, by path."""
    return {
        str(path): path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file() and artifact_id in str(path)
    }


def with_inline(documents: Iterable[bytes]) -> list[bytes]:
    """The documents, and every product inlined in them as a `data:` URL, decoded."""
    found = []
    for data in documents:
        found.append(data)
        found += [base64.b64decode(match) for match in INLINE.findall(data)]
    return found


def unmasked(documents: Iterable[bytes], contributions: dict[str, float | int]) -> list[str]:
    """What gives a contribution away: a number equal to one, or two numbers whose
    difference in the masking ring is one. Empty when nothing does."""
    found: list[str] = []
    numbers: list[int | float] = []
    for data in with_inline(documents):
        text = data.decode(errors="replace")
        for site, value in contributions.items():
            if isinstance(value, float) and repr(value) in text:
                found.append(f"{site}'s {value!r} in plain")
        numbers += list(numbers_in(parsed(data)))
    ring = {n % masking.MODULUS for n in numbers if isinstance(n, int)}
    for site, value in contributions.items():
        target = masking.fixed(value) % masking.MODULUS if isinstance(value, float) else value
        if any(isinstance(n, float) and math.isclose(n, value, rel_tol=1e-12) for n in numbers):
            found.append(f"{site}'s value as a number")
        if target in ring:
            found.append(f"{site}'s value as an integer")
        if any((a - target) % masking.MODULUS in ring for a in ring):
            found.append(f"{site}'s value as the difference of two numbers")
    return found
