"""Give freed memory back to the operating system between the pieces of an extra pass.

glibc's allocator keeps the memory of freed tensors in its heap for reuse. One-off analyses free and
allocate hundreds of megabytes of differently sized tensors (maps, perturbed copies, their similarities),
and the holes they leave are not always reused, so the process's resident memory keeps the high-water
mark of everything the analysis ever held. ``malloc_trim(0)`` returns the free pages; it changes no value
and costs a few milliseconds, so callers that run often ask for it only when the heap holds much free
memory (``mallinfo2``, a tenth of a millisecond). Elsewhere (macOS, Windows, musl) it is a no-op.

Example:
    >>> release_free_memory() in (True, False), release_free_memory(min_free=2**62)
    (True, False)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Any

_MALLINFO2_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


@functools.lru_cache(maxsize=1)
def _libc() -> tuple[Any, Any] | None:
    """glibc's ``malloc_trim`` and ``mallinfo2`` (``None`` before glibc 2.33), or ``None`` without glibc."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    info = getattr(libc, "mallinfo2", None)
    if info is not None:
        info.argtypes, info.restype = [], _MallInfo2
    return trim, info


def free_heap_bytes() -> int | None:
    """Bytes the allocator holds free in its heaps (all arenas), or ``None`` where that cannot be read."""
    libc = _libc()
    if libc is None or libc[1] is None:
        return None
    return int(libc[1]().fordblks)


def release_free_memory(min_free: int = 0) -> bool:
    """Return the allocator's free pages to the operating system, when its heaps hold at least ``min_free``
    free bytes (unknown counts as enough); whether it did."""
    libc = _libc()
    if libc is None:
        return False
    if min_free > 0:
        free = free_heap_bytes()
        if free is not None and free < min_free:
            return False
    libc[0](0)
    return True


__all__ = ["free_heap_bytes", "release_free_memory"]
