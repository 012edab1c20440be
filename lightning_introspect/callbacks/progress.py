"""Progress of long introspection work, shown where the trainer shows its own.

With Lightning's TQDM bar an extra bar line ``introspection: <what>`` appears below the trainer's bars
(``leave=False``: it disappears when the work is done) once the work has taken longer than
:data:`DELAY` seconds, so short work never flickers. With the Rich bar a task is added to the trainer's
live progress display while it is running. Without a progress bar (``enable_progress_bar=False``),
when the bar is disabled, or off rank zero: nothing. Nothing is ever printed line by line.
"""

from __future__ import annotations

import sys
from typing import Any

DELAY = 2.0  # seconds of work before a bar appears


class IntrospectionProgress:
    """A context manager: ``with IntrospectionProgress(trainer, "sanity checks", total=10) as bar: bar.update()``.

    Args:
        trainer: the trainer whose progress bar to follow (``None``: show nothing).
        description: what runs, after ``introspection:``.
        total: the number of steps (``None``: unknown, a counter).

    Example:
        >>> with IntrospectionProgress(None, "nothing to show", total=3) as bar:
        ...     bar.update(3, "done")
        >>> bar.count
        3
    """

    def __init__(self, trainer: Any, description: str, total: int | None = None) -> None:
        self.description = f"introspection: {description}"
        self.total = total
        self.count = 0
        self._tqdm: Any = None
        self._rich: tuple[Any, Any] | None = None
        bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
        if bar is None or not getattr(bar, "is_enabled", False) or not getattr(trainer, "is_global_zero", True):
            return
        rich_progress = getattr(bar, "progress", None)
        if rich_progress is not None and hasattr(rich_progress, "add_task"):
            self._rich = (rich_progress, rich_progress.add_task(self.description, total=total))
        elif type(bar).__name__ == "TQDMProgressBar" or hasattr(bar, "init_validation_tqdm"):
            from tqdm.auto import tqdm

            position = 2 * int(getattr(bar, "process_position", 0)) + 2  # below the trainer's train and val bars
            self._tqdm = tqdm(total=total, desc=self.description, leave=False, delay=DELAY, position=position,
                              dynamic_ncols=True, file=sys.stdout)

    def update(self, n: int = 1, message: str | None = None) -> None:
        """Advance by ``n`` steps; ``message`` (e.g. the layer being randomised) is shown after the count."""
        self.count += n
        if self._tqdm is not None:
            if message is not None:
                self._tqdm.set_postfix_str(message, refresh=False)
            self._tqdm.update(n)
        elif self._rich is not None:
            progress, task = self._rich
            description = self.description if message is None else f"{self.description} ({message})"
            progress.update(task, advance=n, description=description)

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None
        if self._rich is not None:
            progress, task = self._rich
            try:
                progress.remove_task(task)
            except KeyError:  # the trainer's display was reset meanwhile
                pass
            self._rich = None

    def __enter__(self) -> IntrospectionProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
