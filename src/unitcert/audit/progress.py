"""Live progress for the audit's long stages: a bar with rate and ETA.

Shown on a terminal only: off when stderr is not a TTY or with ``--quiet``.
"""

from __future__ import annotations

import sys
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["AuditProgress"]


class _RateColumn(ProgressColumn):
    """How many items a second the stage is going through."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "items")
        shown = "--" if speed is None else f"{speed:,.0f}"
        return Text(f"{shown} {unit}/s", style="progress.data.speed", no_wrap=True)


class AuditProgress:
    """The audit's progress display: one bar per stage.

    Use as a context manager; every method is a no-op when disabled.
    """

    def __init__(self, *, enabled: bool | None = None) -> None:
        """Set up the display.

        Args:
            enabled: show it; by default, when stderr is a terminal.
        """
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> AuditProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def start(self, stage: str, total: int, unit: str) -> None:
        """Show a new bar for ``stage`` with ``total`` items of ``unit``."""
        self._tasks[stage] = self._progress.add_task(stage, total=total, unit=unit)

    def advance(self, stage: str, amount: int = 1) -> None:
        """Move ``stage``'s bar forward by ``amount`` items."""
        self._progress.advance(self._tasks[stage], amount)

    def fraction(self, stage: str, fraction: float) -> None:
        """Set ``stage``'s bar to ``fraction`` of its total."""
        task = self._tasks[stage]
        total = self._progress.tasks[task].total or 0
        self._progress.update(task, completed=round(total * fraction))

    def finish(self, stage: str) -> None:
        """Fill ``stage``'s bar (its total may have been an estimate)."""
        task = self._tasks[stage]
        total = self._progress.tasks[task].total or 0
        self._progress.update(task, completed=total)
