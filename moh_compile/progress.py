"""Progress of long steps (calibration passes, budget re-sets, fine-tuning), one implementation.

On a terminal: a rich bar on stderr, erased when done. Elsewhere (logs, pipes, CI) a bar cannot
redraw, so plain lines go to stderr instead: one when the step ends, and one per 10% of progress
while it runs long (at most every PLAIN_EVERY_S seconds). Silent when disabled or for < 2 steps.
"""
from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 10.0


class progress_bar:
    """`with progress_bar(total, desc) as advance: advance(n=1, description=None)`, or
    `advance = bar.start()` ... `bar.close()` where a with-block does not fit."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.enabled = total, desc, enabled and total > 1
        self.bar = None
        self.plain = False
        self.done = 0

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self):
        if self.enabled:
            from rich.console import Console

            console = Console(file=sys.stderr)
            if console.is_terminal:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

                self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                    TimeElapsedColumn(), console=console, transient=True)
                self.task = self.bar.add_task(self.desc, total=self.total)
                self.bar.start()
            else:
                self.plain = True
                self.started_at = self.last_line = time.perf_counter()
        return self.advance

    def advance(self, n: int = 1, description: str | None = None) -> None:
        self.done += n
        if description:
            self.desc = description
        if self.bar is not None:
            self.bar.update(self.task, advance=n, **({"description": description} if description else {}))
        elif self.plain and self.done < self.total:
            now = time.perf_counter()
            if (now - self.last_line >= PLAIN_EVERY_S
                    and int(10 * self.done / self.total) > int(10 * (self.done - n) / self.total)):
                self._line(now)

    def _line(self, now: float) -> None:
        self.last_line = now
        print(f"{self.desc}: {min(100.0, 100.0 * self.done / self.total):.0f}% ({now - self.started_at:.0f}s)",
              file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.plain:
            self._line(time.perf_counter())


__all__ = ["progress_bar", "PLAIN_EVERY_S"]
