"""Progress for long training runs: a rich bar with loss, throughput and ETA, plus one line per epoch.

Everything goes to stderr, so ``--json`` keeps stdout machine-readable; ``quiet`` draws no bar and no notes
but still prints warnings (corrupt images skipped, say) unless ``warnings`` is off (the other ranks under
torchrun). The bar's total is the stage's remaining steps, so the ETA covers the whole stage, not one epoch.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["Reporter"]


class Reporter:
    """Draws the progress bar of one stage at a time and prints notes and epoch summaries."""

    def __init__(self, quiet: bool = False, console: Console | None = None, warnings: bool = True):
        self.quiet = quiet
        self.warnings = warnings
        self.console = console or Console(stderr=True, highlight=False)
        self._progress: Progress | None = None
        self._bar: Any = None
        self._seen = 0
        self._start = 0.0

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, soft_wrap=True)

    def warn(self, message: str) -> None:
        if self.warnings:
            self.console.print(f"[yellow]warning:[/] {message}", soft_wrap=True)

    def start(self, title: str, total_steps: int, done_steps: int = 0) -> None:
        self._seen = 0
        self._start = time.perf_counter()
        if self.quiet:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self._progress.start()
        self._bar = self._progress.add_task(title, total=total_steps, completed=done_steps, loss="-", speed="-")

    def step(self, images: int, loss: float | None, description: str | None = None) -> None:
        self._seen += images
        if self._progress is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        fields: dict[str, Any] = {"speed": f"{self._seen / elapsed:,.0f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if description:
            fields["description"] = description
        self._progress.update(self._bar, advance=1, **fields)

    def epoch(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.print(line, soft_wrap=True)
        elif not self.quiet:
            self.console.print(line, soft_wrap=True)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress = None
