"""Warnings that point at the user's code: the line of theirs that led to the warning (their
``trainer.fit(...)``, their ``Attributions(layer=...)``), never a line of ours or of Lightning's.

Python reports a warning at the frame ``stacklevel`` levels up; a fixed number is wrong for us, since the
same warning can be raised from a Lightning hook deep in ``trainer.fit``, from a callback's constructor,
or from ``introspection_callbacks``. So :func:`warn` skips every frame that lies in this package or in
the libraries between the user and us (Lightning in each flavour, lightning_fabric, lightning_utilities,
torch): with ``warnings.warn(..., skip_file_prefixes=...)`` on Python >= 3.12, and by walking the stack
to the same frame on older versions.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
import warnings

#: the packages whose frames are never "the user's code"
INTERNAL_PACKAGES = ("lightning_introspect", "pytorch_lightning", "lightning", "lightning_fabric", "lightning_utilities", "torch")


@functools.cache
def internal_prefixes() -> tuple[str, ...]:
    """The directories of :data:`INTERNAL_PACKAGES` that are installed (each ending in a separator)."""
    prefixes = []
    for name in INTERNAL_PACKAGES:
        try:
            spec = importlib.util.find_spec(name)  # locates the package without importing it
        except (ImportError, ValueError):
            continue
        for location in (spec.submodule_search_locations or ()) if spec is not None else ():
            prefixes.append(os.path.join(os.path.abspath(location), ""))
            real = os.path.join(os.path.realpath(location), "")
            if real != prefixes[-1]:
                prefixes.append(real)
    return tuple(prefixes)


def _internal(filename: str, prefixes: tuple[str, ...]) -> bool:
    # importlib's bootstrap frames (a warning raised while a module is imported) are skipped as Python does
    return filename.startswith(prefixes) or ("importlib" in filename and "_bootstrap" in filename)


def external_stacklevel(frame: object = None) -> int:
    """The ``stacklevel`` for ``warnings.warn`` called in the function that calls this one, that lands on
    the first frame outside :func:`internal_prefixes` (the outermost frame if every frame is internal).

    Example:
        >>> external_stacklevel()  # called from a doctest: the caller is already outside the package
        2
    """
    prefixes = internal_prefixes()
    current = sys._getframe(1) if frame is None else frame  # the frame that will call warnings.warn
    level = 1
    while current is not None:
        caller = current.f_back  # type: ignore[attr-defined]
        if caller is None:
            break
        level += 1
        if not _internal(caller.f_code.co_filename, prefixes):
            break
        current = caller
    return level


def _rank() -> int:
    try:
        from lightning_utilities.core.rank_zero import rank_zero_only
    except ImportError:  # pragma: no cover - Lightning always brings it
        return 0
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def warn(message: str, category: type[Warning] = UserWarning, *, rank_zero: bool = True) -> None:
    """``warnings.warn(message, category)`` reported at the user's line of code (see the module docstring).

    Args:
        message: the warning's text.
        category: the warning class.
        rank_zero: warn on global rank zero only (as Lightning's ``rank_zero_warn``), so a DDP fit says
            it once.
    """
    if rank_zero and _rank() != 0:
        return
    if sys.version_info >= (3, 12):
        warnings.warn(message, category, stacklevel=2, skip_file_prefixes=internal_prefixes())
    else:
        warnings.warn(message, category, stacklevel=external_stacklevel(sys._getframe(0)))


__all__ = ["INTERNAL_PACKAGES", "external_stacklevel", "internal_prefixes", "warn"]
