"""A one-line progress display on stderr (throttled; plain lines when stderr is not a terminal)."""

import sys
import time


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Line:
    """`show` rewrites the line in place on a terminal (at most every `every` s); elsewhere (a log file, a pipe) it
    writes a plain line at most every `pipe_every` s (None: only the lines shown with force=True)."""

    def __init__(self, stream=None, every=0.25, pipe_every=10.0):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if self.tty else (float("inf") if pipe_every is None else pipe_every)
        self._last = 0.0
        self._shown = False

    def show(self, text, force=False):
        now = time.monotonic()
        if not force and (now - self._last < self.every or self.every == float("inf")):
            return
        self._last = now
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        self._shown = True

    def done(self):
        if self.tty and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = False
