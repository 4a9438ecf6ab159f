"""Progress bars for long Rust loops: tqdm (notebook-aware through tqdm.auto) when installed,
otherwise a minimal text bar on stderr."""

from __future__ import annotations

import sys
import time


class _TextBar:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.n = total, desc, 0
        self.start = time.monotonic()
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last > 0.2 or (self.total and self.n >= self.total):
            self._last = now
            rate = self.n / max(now - self.start, 1e-9)
            if not self.total:  # an unknown number of steps (adaptive solvers): a count
                sys.stderr.write(f"\r{self.desc}: {self.n} steps {rate:.1f} it/s")
            else:
                width = 30
                done = int(width * self.n / self.total)
                sys.stderr.write(
                    f"\r{self.desc}: [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} {rate:.1f} it/s"
                )
            sys.stderr.flush()

    def close(self) -> None:
        if not self.total:
            sys.stderr.write(f"\r{self.desc}: {self.n} steps")
        sys.stderr.write("\n")
        sys.stderr.flush()


def progress_bar(total: int, desc: str = ""):
    """A progress bar with ``update(n)`` and ``close()``; ``total=0``: an unknown number of
    steps (a counter)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, desc)
    return tqdm(total=total or None, desc=desc)
