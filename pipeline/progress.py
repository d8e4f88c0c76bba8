"""Progress reporting: rich bars on a terminal, silence for --quiet and --json."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[[int], None]


class Progress:
    """Silent progress; `RichProgress` draws bars. Stages only call `task` and `note`."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n=1: None

    def note(self, message: str) -> None:
        """A one-line status message."""


class RichProgress(Progress):
    def __init__(self, console) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        from rich.progress import BarColumn, MofNCompleteColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bars

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn()]
        with Bars(*columns, console=self.console, transient=False) as bars:
            task_id = bars.add_task(description, total=total)
            yield lambda n=1: bars.advance(task_id, n)
            if total is None:
                bars.update(task_id, total=1, completed=1)

    def note(self, message: str) -> None:
        self.console.print(message)
