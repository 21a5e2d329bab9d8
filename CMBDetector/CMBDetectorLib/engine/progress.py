"""A dependency-free progress bar on stderr (the CLI's long work)."""
from __future__ import annotations

import sys
import time


class ProgressBar:
    """``bar(fraction, text)`` redraws one stderr line; ``close()`` ends it.

    On a non-terminal stderr (logs, CI) it prints a line only every 10 %, so logs stay short.
    """

    def __init__(self, label: str = "", width: int = 30, stream=None):
        self.label, self.width = label, width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_decile = -1

    def __call__(self, fraction: float, text: str = "") -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        filled = int(round(self.width * fraction))
        line = (f"{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                f"{100 * fraction:5.1f}% {time.perf_counter() - self.t0:6.1f}s {text}")
        if self.tty:
            self.stream.write("\r" + line[:120].ljust(120))
            self.stream.flush()
        elif int(fraction * 10) > self._last_decile:
            self._last_decile = int(fraction * 10)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
