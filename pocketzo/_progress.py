"""A dependency-free progress bar for long loops (the device side has no tqdm)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """``with Progress(total, "train") as bar: bar.update(1, loss=...)``.

    On a terminal it redraws one line at most 4 times a second; otherwise it prints a line
    every 10 % so logs stay readable.
    """

    def __init__(self, total: int, desc: str, stream: TextIO | None = None, enabled: bool = True):
        self.total, self.desc, self.n = max(total, 1), desc, 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.start = self._last = time.perf_counter()
        self._last_decile = -1
        self.fields: dict[str, str] = {}

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self._draw(final=True)

    def set(self, **fields: object) -> None:
        for k, v in fields.items():
            self.fields[k] = f"{v:.4g}" if isinstance(v, float) else str(v)

    def update(self, n: int = 1, **fields: object) -> None:
        self.n += n
        self.set(**fields)
        now = time.perf_counter()
        decile = 10 * self.n // self.total
        if (self.tty and now - self._last >= 0.25) or (not self.tty and decile > self._last_decile):
            self._last, self._last_decile = now, decile
            self._draw()

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * min(self.n, self.total) / self.total)
        extra = " ".join(f"{k}={v}" for k, v in self.fields.items())
        line = (f"{self.desc} [{'#' * filled}{'.' * (width - filled)}] {self.n}/{self.total} "
                f"{elapsed:.0f}s<{eta:.0f}s {extra}")
        if self.tty:
            self.stream.write("\r\x1b[K" + line + ("\n" if final else ""))
        elif final or self.n < self.total:
            self.stream.write(line + "\n")
        self.stream.flush()
