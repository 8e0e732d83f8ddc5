"""One progress-bar style for long work: steps, throughput and ETA (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


class ThroughputColumn(ProgressColumn):
    """Items per second, e.g. ``38.2 img/s``."""

    def __init__(self, unit: str = "img"):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed")


def make_progress(unit: str = "img", *, disable: bool = False, console: Console | None = None,
                  extra: str = "") -> Progress:
    """A rich Progress with count, throughput, elapsed time and ETA (``extra`` adds a field column)."""
    columns = [SpinnerColumn(), TextColumn("[progress.description]{task.description}"), BarColumn(),
               MofNCompleteColumn(), ThroughputColumn(unit), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(extra))
    return Progress(*columns, disable=disable, console=console or Console(stderr=True), transient=False)
