"""Progress on stderr: a tqdm bar on a terminal; on a pipe or log file (a server's stderr under
systemd, docker, `2> log`) a few plain lines instead, since a bar redraws itself with `\\r` and
fills logs with noise."""

from __future__ import annotations

import sys
import time


def stderr_is_terminal() -> bool:
    stream = sys.stderr
    return stream is not None and hasattr(stream, "isatty") and stream.isatty()


class PlainProgress:
    """tqdm's update/close, written as a line at 0, 25, 50, 75 and 100 %."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit = max(total, 1), desc, unit
        self.done, self.quarter, self.t0 = 0, 0, time.monotonic()
        self._say(f"0/{total} {unit}s")

    def _say(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=sys.stderr, flush=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        quarter = min(4, 4 * self.done // self.total)
        if 0 < quarter < 4 and quarter > self.quarter:
            self._say(f"{self.done}/{self.total} {self.unit}s ({25 * quarter}%)")
        self.quarter = max(self.quarter, quarter)

    def close(self) -> None:
        self._say(f"done, {self.done} {self.unit}s in {time.monotonic() - self.t0:.1f} s")


def progress_bar(total: int, desc: str, unit: str):
    """A progress reporter with tqdm's update(n) / close()."""
    if stderr_is_terminal():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False)
    return PlainProgress(total, desc, unit)


class ProgressCallback:
    """A `progress(done, total)` callback (weights.loader) shown as a progress_bar, opened at the
    first call: only the caller knows the total."""

    def __init__(self, desc: str, unit: str):
        self.desc, self.unit, self.bar, self.done = desc, unit, None, 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = progress_bar(total, self.desc, self.unit)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
