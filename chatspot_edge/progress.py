"""Progress bars for long jobs (rich), with a plain-log fallback when stderr is not a terminal (CI, pipes)."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

ProgressFn = Callable[[int, int], None]


@contextmanager
def task_progress(name: str) -> Iterator[ProgressFn]:
    """Yields `update(done, total)`. On a terminal a rich bar with rate and ETA; otherwise a line every ~10%."""
    if sys.stderr.isatty():
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(name), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      transient=False) as bar:
            task = bar.add_task(name, total=None)

            def update(done: int, total: int) -> None:
                bar.update(task, completed=done, total=total)

            yield update
        return
    start = time.perf_counter()
    last = [-1]

    def update(done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done // step != last[0]:
            last[0] = done // step
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"{name}: {done}/{total} ({rate:.1f}/s)", file=sys.stderr, flush=True)

    yield update
