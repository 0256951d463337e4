"""The console of ``kubetune run --local``: a line per step on the terminal, everything in a log file.

kfp.local prints every step's full log (its executor input as JSON included) on stdout; this stream takes that
output, keeps all of it in ``<workdir>/logs/run-<time>.log`` and shows one line when a step starts, finishes
(with its time) or comes from the cache, the SFT step's progress, and, when a step fails, that step's own error
and fix. ``--verbose`` (or ``KUBETUNE_VERBOSE=1``) shows the full output as it comes.
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path
from typing import TextIO

from kubetune.secrets import redact_values, secret_values

ANSI_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
STARTED = re.compile(r"Executing task '([^']+)'")
FINISHED = re.compile(r"Task '([^']+)' finished with status (\w+)")
PROGRESS = re.compile(r"(training step \d+/\d+.*)$")
ERROR = "kubetune: error: "
FIX = "  Fix: "
PROGRESS_EVERY_S = 10.0


def verbose_from_env(environ: dict[str, str] | None = None) -> bool:
    value = (os.environ if environ is None else environ).get("KUBETUNE_VERBOSE", "")
    return value.strip().lower() in ("1", "true", "yes", "on")


class StepConsole(io.TextIOBase):
    """A text stream for kfp.local's stdout and stderr (see the module docstring). ``names``: each task's display
    name; ``upstream``: the tasks each one waits for."""

    def __init__(self, log_path: Path, out: TextIO, *, verbose: bool = False, names: dict[str, str] | None = None,
                 upstream: dict[str, list[str]] | None = None):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = log_path
        self._log = log_path.open("w", encoding="utf-8")
        self._out, self._verbose, self._names, self._upstream = out, verbose, names or {}, upstream or {}
        self._pending = ""
        self._secrets = secret_values()
        self._started: dict[str, float] = {}
        self._last_progress = 0.0
        self.step_errors: list[tuple[str, str]] = []  # (problem, fix) of each step that stopped with a clear error
        self.failed: list[str] = []
        self.tail: list[str] = []  # the last lines of output
        self.failure_tail: list[str] = []  # the last lines when the first step failed, for one that died silently

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._write_line(line + "\n")
        return len(text)

    def _write_line(self, line: str) -> None:
        # kfp.local echoes every step's parameters as given: a secret in one (a persona, a probe question) is
        # redacted here, before it reaches the log file or the terminal.
        line = redact_values(line, self._secrets)
        self._log.write(line)
        if self._verbose:
            self._out.write(line)
        self._line(ANSI_COLOUR.sub("", line.rstrip("\n")))

    def flush(self) -> None:
        if not self._log.closed:
            self._log.flush()
        self._out.flush()

    def close(self) -> None:
        if self._pending:
            self._write_line(self._pending)
            self._pending = ""
        self.flush()
        self._log.close()
        super().close()

    # -- one line at a time ----------------------------------------------------------------------------------
    def _line(self, line: str) -> None:
        stripped = line.strip()
        if stripped:
            self.tail = [*self.tail[-19:], stripped]
        if stripped.startswith(ERROR):
            self.step_errors.append((stripped[len(ERROR):], ""))
        elif stripped.startswith(FIX.strip()) and self.step_errors and not self.step_errors[-1][1]:
            self.step_errors[-1] = (self.step_errors[-1][0], stripped[len(FIX.strip()):].strip())
        if self._verbose:
            return
        if match := STARTED.search(line):
            self._report_cached(before=match.group(1))
            self._started[match.group(1)] = time.monotonic()
            self._say(f"  {self._name(match.group(1))} ...")
        elif match := FINISHED.search(line):
            task, status = match.groups()
            seconds = time.monotonic() - self._started.get(task, time.monotonic())
            if status == "SUCCESS":
                self._say(f"✓ {self._name(task)}: done in {seconds:.0f} s")
            else:
                if not self.failed:
                    self.failure_tail = list(self.tail[:-1])
                self.failed.append(task)
                self._say(f"✗ {self._name(task)}: {status.lower()} after {seconds:.0f} s")
        elif (match := PROGRESS.search(line)) and time.monotonic() - self._last_progress >= PROGRESS_EVERY_S:
            self._last_progress = time.monotonic()
            self._say(f"    {match.group(1)}")

    def _report_cached(self, before: str) -> None:
        """The steps ``before`` waits for that never started were served from kfp.local's cache (which says so
        only at debug level)."""
        if self.failed:  # after a failure, steps that did not start were skipped
            return
        for task in self._upstream.get(before, []):
            if task not in self._started:
                self._started[task] = time.monotonic()
                self._say(f"✓ {self._name(task)}: from the cache (same settings and source versions)")

    def _name(self, task: str) -> str:
        name = self._names.get(task)
        return f"{task} ({name})" if name else task

    def _say(self, text: str) -> None:
        self._out.write(text + "\n")
        self._out.flush()
