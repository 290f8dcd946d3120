"""A one-line progress display on stderr (throttled; plain lines when stderr is not a terminal)."""

import sys
import time


def fmt_time(s):
    s = int(max(s, 0))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class Line:
    def __init__(self, stream=None, every=0.25):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every = every if self.tty else 10.0
        self._last = 0.0
        self._shown = False

    def show(self, text, force=False):
        now = time.monotonic()
        if not force and now - self._last < self.every:
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
