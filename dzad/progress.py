"""One progress display for training steps and scored images (``dzad train``, ``score``,
``evaluate``), on stderr.

On a terminal it is a Rich bar (count, time left, a status such as the loss), removed when done.
Anywhere else (a log file, a pipe, CI, a DVC stage) a bar's refreshes would be one line each, so it
writes a plain line every ``every_s`` seconds and one when the work is done:
``train: 120/600 steps (20%), 41 s, about 2 min 44 s left, loss 0.0123``. A run that fails writes no
closing line (its error is the last one).
"""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import Any

EVERY_S = 30.0  # seconds between two log lines when stderr is not a terminal


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"


class Progress:
    """``with Progress(total, "train", "steps") as bar: bar.advance(1, loss="0.0123")``.

    ``enabled`` False shows nothing; ``initial`` is the count already done (a resumed run).
    """

    def __init__(
        self,
        total: int,
        what: str,
        unit: str,
        *,
        enabled: bool = True,
        initial: int = 0,
        every_s: float = EVERY_S,
    ) -> None:
        from rich.console import Console

        self.total, self.what, self.unit, self.every_s = total, what, unit, every_s
        self.done = self.initial = initial
        self.status: dict[str, str] = {}
        self.enabled = enabled
        console = Console(stderr=True)
        self.bar = None
        if enabled and console.is_terminal:
            from rich import progress as rp

            self.bar = rp.Progress(
                f"[bold]{what}",
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TimeRemainingColumn(),
                rp.TextColumn("{task.fields[status]}"),
                console=console,
                transient=True,
            )
            self.task = self.bar.add_task(what, total=total, completed=initial, status="")

    def __enter__(self) -> Progress:
        self.start = self.last = time.monotonic()
        if self.bar is not None:
            self.bar.start()
        return self

    def advance(self, n: int = 1, **status: Any) -> None:
        """``n`` more done; ``status`` (e.g. ``loss="0.0123"``) is shown beside the count."""
        self.done += n
        self.status.update({k: str(v) for k, v in status.items()})
        if self.bar is not None:
            text = ", ".join(f"{k} {v}" for k, v in self.status.items())
            self.bar.update(self.task, advance=n, status=text)
        elif self.enabled and time.monotonic() - self.last >= self.every_s:
            self._line()

    def line(self) -> str:
        """The plain progress line (what a log gets)."""
        elapsed = time.monotonic() - self.start
        parts = [f"{self.what}: {self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done // self.total}%)"
        parts.append(_duration(elapsed))
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        if 0 < self.done < self.total and rate > 0:
            parts.append(f"about {_duration((self.total - self.done) / rate)} left")
        parts += [f"{k} {v}" for k, v in self.status.items()]
        return ", ".join(parts)

    def _line(self) -> None:
        self.last = time.monotonic()
        print(self.line(), file=sys.stderr, flush=True)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.bar is not None:
            self.bar.stop()
        elif self.enabled and kind is None and self.done > self.initial:
            self._line()  # the closing line of a log
