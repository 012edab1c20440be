"""Keep an introspection run's short-lived reference cycles out of the old generation of Python's collector.

A run builds short-lived reference cycles: hook closures and handles that live as long as the run, the
frames of an exception it contains, matplotlib figures where one is still drawn. With the collector on, young
collections during the run find them alive and promote them; once they pile up in the old generation, the
interpreter schedules a full collection, which walks every object of the process: torch's, Lightning's and the
user's, about half a million in the demo (0.3 s there, when its charts were matplotlib figures, in a fit of
five seconds). Paused for the run, they stay young, are garbage when the run returns, and one young
collection frees them (milliseconds). The collector decides only *when* unreachable objects are freed, never
what is computed, so training and every result are the same.

Example:
    >>> import gc
    >>> with collector_paused():
    ...     gc.isenabled()
    False
    >>> gc.isenabled()
    True
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["collector_paused"]


@contextmanager
def collector_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for the block, then collect the youngest generation (what the block
    left unreachable). Nested blocks, and a collector the user switched off, are left as they are."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.collect(0)
