"""A progress line on stderr for ``portattn bench``, with no dependency.

On a terminal: one line redrawn in place (``\\r``) -- a bar, problems done / total, and what is being
done now (which contender is compiling). Elsewhere (a log file, CI): one plain line per problem, so
the log stays readable.
"""

from __future__ import annotations

import shutil
import sys
import time

WIDTH = 24


class ProgressBar:
    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.started = time.perf_counter()

    def __call__(self, done: int, total: int, problem, stage: str) -> None:
        elapsed = time.perf_counter() - self.started
        if stage == "done":
            if self.tty:
                self.stream.write("\r\033[K")  # leave the terminal clean for the table
            self.stream.write(f"bench: {total} problem(s) in {elapsed:.0f} s\n")
            self.stream.flush()
            return
        label = f"{problem.label()} {problem.dtype}"
        if self.tty:
            filled = WIDTH * done // max(1, total)
            line = f"[{'#' * filled}{'.' * (WIDTH - filled)}] {done}/{total} {elapsed:4.0f}s {label}: {stage}"
            columns = shutil.get_terminal_size((100, 20)).columns
            self.stream.write("\r\033[K" + line[: columns - 1])
            self.stream.flush()
        elif stage == "start":
            self.stream.write(f"bench [{done + 1}/{total}] {elapsed:.0f}s {label}\n")
            self.stream.flush()
