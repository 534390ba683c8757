"""Progress of the long stages (training, statistics, merges, sweeps, landscapes, evaluations), on stderr only.

On a terminal a loop shows a tqdm bar that vanishes when it ends. Anywhere else, e.g. the log file a pipeline job
writes, tqdm's carriage returns would pile up into one unreadable line, so a loop writes plain lines instead: at most
one every `HETMERGE_PROGRESS_SECONDS` seconds (default 10; 0: after every step) while it runs, and one final line
when it ends, if it printed a line before or took at least a second (most jobs of the default run take less, and
their logs stay free of one-line summaries of instant loops). Nothing is ever written to stdout, which some commands
answer on, and nothing here draws random numbers or touches the data, so progress never changes a result.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from types import TracebackType
from typing import TypeVar

from tqdm import tqdm

ENV = "HETMERGE_PROGRESS_SECONDS"
DEFAULT_SECONDS = 10.0
FINAL_SECONDS = 1.0  # a loop that printed nothing before writes its final line only if it took this long
PLURALS = {"batch": "batches"}  # units whose plural is not unit + "s"

T = TypeVar("T")


def interval() -> float:
    """Seconds between two progress lines in a log file, from `HETMERGE_PROGRESS_SECONDS`."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return DEFAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{ENV}={text!r} is not a number of seconds") from None
    if not seconds >= 0:  # also refuses NaN
        raise ValueError(f"{ENV}={text!r}: the seconds between progress lines must be 0 or more")
    return seconds


def duration(seconds: float) -> str:
    """'3.1 s', '12 min 03 s' or '2 h 05 min': as precise as a reader of a log needs."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def log(message: str) -> None:
    """One line on stderr that leaves a running bar intact (tqdm redraws it below the line on a terminal)."""
    if sys.stderr.isatty():
        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr, flush=True)


class Progress:
    """The progress of one loop: `update(n)` after every n steps done, `close()` (or the end of a `with` block) when
    it ends. Leaving the `with` block by an exception prints no final line: the error says where it stopped.

    `total`: the steps expected (None where unknown, e.g. sweeps until convergence); `initial`: steps done before
    (a resumed training), which count towards the total but not towards the time left.
    """

    def __init__(self, desc: str, *, total: int | None = None, unit: str = "step", initial: int = 0) -> None:
        self.desc, self.total, self.unit = desc, total, unit
        self.count = self.initial = initial
        self.start = self.last = time.monotonic()
        self.printed = False
        self.closed = False
        self.every = interval()
        self.bar: tqdm | None = None
        if sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, leave=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close(finished=kind is None)

    def _units(self, n: int) -> str:
        if n == 1:
            return self.unit
        return PLURALS.get(self.unit, f"{self.unit}s")

    def update(self, n: int = 1) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last < self.every:
            return
        self.last, self.printed = now, True
        elapsed = now - self.start
        counted, left = f"{self.count} {self._units(self.count)}", ""
        if self.total is not None:
            counted = f"{self.count}/{self.total} {self._units(self.total)} ({self.count / max(self.total, 1):.0%})"
            done = self.count - self.initial  # this run's steps: a resumed run's earlier ones took no time here
            if done > 0 and self.count < self.total:
                left = f", about {duration((self.total - self.count) * elapsed / done)} left"
        log(f"{self.desc}: {counted}, {duration(elapsed)}{left}")

    def close(self, finished: bool = True) -> None:
        """End the loop: clear the bar, or write the final line (only if `finished`, and printed before or slow)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            return
        elapsed = time.monotonic() - self.start
        if finished and (self.printed or elapsed >= FINAL_SECONDS):
            done = self.count - self.initial  # the steps the time was spent on
            resumed = f" (resumed after {self.initial})" if self.initial else ""
            log(f"{self.desc}: {done} {self._units(done)} in {duration(elapsed)}{resumed}")


def track(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "step") -> Iterator[T]:
    """`iterable`, counting a step each time the loop asks for the next item (so a step is the loop body's work too).

    `total` defaults to `len(iterable)` where it has one. The clock starts when the loop does. A loop left early
    (break, an error) prints no final line; for loops that stop early by design, use `Progress`.
    """
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    with Progress(desc, total=total, unit=unit) as progress:
        for item in iterable:
            yield item
            progress.update()
