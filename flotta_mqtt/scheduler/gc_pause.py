"""Pausing the cyclic garbage collector while a large job graph is built or stored."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic collector for the block, then resume it as it was.

    Binding a large artifact allocates millions of objects that all live on: the
    collections they trigger free nothing and cost a large share of binding's time.
    Reference counting still frees everything else meanwhile.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
