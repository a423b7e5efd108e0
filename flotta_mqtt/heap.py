"""A node's heap while it serves: collected once at its start, then kept out of the
collector's scans until it stops."""

from __future__ import annotations

import gc


def settle() -> None:
    """Collect what a node's start left over, then freeze what lives on.

    A start imports and opens much that lives as long as the process (pyarrow, DuckDB,
    pydantic's schemas, the operation registry). Left in the cyclic collector's oldest
    generation, it was scanned in full by the first full collection, which fell in the
    first artifact and made most of its extra time (bench/README.md), and again by every
    later one. Frozen, the collector never scans it again; reference counting still frees
    each object when its last reference goes.
    """
    gc.collect()
    gc.freeze()


def release() -> None:
    """Give what `settle` froze back to the collector, at a node's stop: the cycles among it
    that have become garbage since (a stopped node's own, in a process that starts nodes
    again, as tests do) are freed by the next collection instead of kept for ever."""
    gc.unfreeze()
