"""Rich progress bars with the rates users watch (examples/s, tokens/s, ETA)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

console = Console(soft_wrap=True)  # results (tables, summaries)
status = Console(stderr=True, soft_wrap=True)  # progress, notes and errors, kept out of piped results


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def shorten(text, width: int = 70) -> str:
    """One line of a user's text, safe to print in a table (rich markup escaped)."""
    from rich.markup import escape

    text = " ".join(str(text).split())
    return escape(text if len(text) <= width else text[: width - 1] + "…")


class RateProgress:
    """A progress bar over items that also reports a second quantity per second (tokens)."""

    def __init__(self, description: str, total: int, unit: str = "examples", extra_unit: str | None = "tokens",
                 enabled: bool = True, lazy: bool = False):
        """``lazy``: show the bar only from :meth:`begin` or the first :meth:`advance`, so work
        that fails its checks first prints its error without an empty bar above it."""
        self.unit = unit
        self.extra_unit = extra_unit
        self.start = time.perf_counter()
        self.extra = 0
        self.done = 0
        self.note = ""
        columns = [
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"),
            TimeRemainingColumn(),
        ]
        self._progress = Progress(*columns, console=status, disable=not enabled, transient=False)
        self._task = self._progress.add_task(description, total=total, rates="")
        self._lazy = lazy
        self._shown = False

    def __enter__(self) -> "RateProgress":
        if not self._lazy:
            self.begin()
        return self

    def __exit__(self, *exc) -> None:
        if self._shown:
            self._progress.__exit__(*exc)

    def begin(self) -> None:
        if not self._shown:
            self._shown = True
            self.start = time.perf_counter()
            self._progress.__enter__()

    def advance(self, n: int, extra: int = 0) -> None:
        self.begin()
        self.done += n
        self.extra += extra
        dt = max(time.perf_counter() - self.start, 1e-9)
        rates = f"{self.done / dt:,.1f} {self.unit}/s"
        if self.extra_unit:
            rates += f"  {self.extra / dt:,.0f} {self.extra_unit}/s"
        if self.note:
            rates += f"  {self.note}"
        self._progress.update(self._task, advance=n, rates=rates)

    def set_text(self, note: str) -> None:
        """A short status shown after the rates (e.g. the current loss)."""
        self.note = note
