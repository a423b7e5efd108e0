"""A node process's heap: collected once when its node has started, then kept out of the
collector's scans for the process's life.

Only for a process that is the node's alone (`flotta-mqtt scheduler|worker`, through
cli/serving.py): freezing is process-wide, so a library embedding a node in its own
process keeps its collector as it is.
"""

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
