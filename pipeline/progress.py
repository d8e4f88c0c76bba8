"""Progress reporting: rich bars on a terminal, silence for --quiet and --json."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[..., None]  # advance(n=1, description=None): n steps done, optionally a new label


class Progress:
    """Silent progress; `RichProgress` draws bars. Stages only call `task` and `note`."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        yield lambda n=1, description=None: None

    def note(self, message: str) -> None:
        """A one-line status message."""

    def cache_identity(self) -> None:
        """Progress shows work; it changes no output, so no cache key records it."""
        return None


SILENT = Progress()  # the default of every function that reports progress: stateless, so shared


class RichProgress(Progress):
    def __init__(self, console) -> None:
        self.console = console

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[Advance]:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as Bars

        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TimeElapsedColumn()]
        with Bars(*columns, console=self.console, transient=False) as bars:
            task_id = bars.add_task(description, total=total)
            def advance(n: int = 1, description: str | None = None) -> None:
                bars.advance(task_id, n)
                if description is not None:
                    bars.update(task_id, description=description)

            yield advance
            if total is None:
                bars.update(task_id, total=1, completed=1)

    def note(self, message: str) -> None:
        self.console.print(message)
