"""Console feedback: a line per finished stage, a spinner or bar while one runs (rich, on stderr)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class Reporter:
    """Stage timings for the report plus what the user sees; ``quiet`` prints nothing, ``verbose`` adds
    each pass's outcome and each tensor's choice.

    One rich ``Progress`` display carries both the running stage (spinner) and any bar inside it, since
    rich allows one live display at a time.
    """

    def __init__(self, quiet: bool = False, verbose: bool = False, wording: Callable[[str], str] = str):
        self.console = Console(stderr=True, quiet=quiet, highlight=False, soft_wrap=True)
        self.verbose = verbose
        self.wording = wording  # how settings are named (`field` for the API; the CLI passes its flags)
        self.timings: dict[str, float] = {}
        self._live = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
        self._started = False

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the live display (it stays up between stages so the output has no gaps)."""
        if self._started:
            self._live.stop()
            self._started = False

    @contextlib.contextmanager
    def _display(self):
        if not self._started:
            self._live.start()
            self._started = True
        yield

    @contextlib.contextmanager
    def stage(self, name: str):
        """A timed stage; it ends with ✓, or with ``!`` and the reason when the body called ``warn`` on what
        this yields (a stage that ran but whose result is not to be trusted)."""
        start = time.perf_counter()
        outcome = _Outcome()
        with self._display():
            task = self._live.add_task(name, total=None)
            try:
                yield outcome
            finally:
                self._live.remove_task(task)
        self.timings[name] = round(time.perf_counter() - start, 3)
        if outcome.warning:
            self.console.print(f"[bold red]![/] {name} [dim]({self.timings[name]:.1f} s)[/]: [red]{self.wording(outcome.warning)}[/]")
        else:
            self.console.print(f"[green]✓[/] {name} [dim]({self.timings[name]:.1f} s)[/]")

    def track(self, items, description: str):
        """Iterate over a sized collection with a progress bar."""
        with self._display():
            task = self._live.add_task(description, total=len(items))
            try:
                for item in items:
                    yield item
                    self._live.advance(task)
            finally:
                self._live.remove_task(task)

    def note(self, text: str) -> None:
        self.console.print(self.wording(text))

    def debug(self, text: str) -> None:
        """A detail line, shown with ``verbose`` only."""
        if self.verbose:
            self.console.print(f"[dim]{self.wording(text)}[/]")


class _Outcome:
    warning: str | None = None

    def warn(self, text: str) -> None:
        self.warning = text
