"""Delivery that survives a tracking-server outage: every MLflow call of a :class:`~kubetune.tracking.Tracker`
goes through :meth:`DeliveryQueue._send`; when the server is down the call is queued in memory and replayed, in
order, by :meth:`DeliveryQueue.flush`. Calls the server rejects are dropped and reported, never retried."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetune.tracking.run import Tracker

log = logging.getLogger("kubetune.tracking")

RETRY_INTERVAL_S = 20.0  # while the server is down, try again at most this often


def _permanent(exc: Exception) -> bool:
    """A request the server rejected (bad value, changed param, missing run): retrying cannot help."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (401, 403, 408, 429)


class DeliveryQueue:
    """The queue half of :class:`~kubetune.tracking.Tracker` (a mixin: the state lives in the Tracker)."""

    def _send(self: Tracker, what: str, call: Callable[[], Any]) -> None:
        with self._lock:
            if not self.run_id or self.pending:
                self.pending.append((what, call))
                if self.run_id and time.time() >= self.retry_after:
                    self.flush(quiet=True)
                return
            try:
                call()
            except Exception as exc:  # noqa: BLE001
                if _permanent(exc):
                    self._drop(what, exc)
                    return
                log.warning("MLflow %s failed (%s); queued for retry", what, type(exc).__name__)
                self.pending.append((what, call))
                self.retry_after = time.time() + RETRY_INTERVAL_S

    def _drop(self: Tracker, what: str, exc: Exception) -> None:
        message = self._redact(f"MLflow rejected {what}: {str(exc)[:300]}")
        self.errors.append(message)
        log.warning("%s (not retried)", message)

    def flush(self: Tracker, *, timeout_s: float = 0.0, quiet: bool = False, **open_kwargs) -> bool:
        """Replay queued calls, retrying until ``timeout_s``; True when nothing is left queued."""
        deadline = time.time() + timeout_s
        while True:
            with self._lock:
                what, exc = self._deliver(open_kwargs)
                if exc is None:
                    return True
                self.retry_after = time.time() + RETRY_INTERVAL_S
                if time.time() >= deadline:
                    if not quiet:
                        self.errors.append(self._redact(f"MLflow {what} failed: {exc!s:.200}"))
                    return False
            time.sleep(min(5.0, max(0.5, deadline - time.time())))  # without the lock: logging goes on meanwhile

    def _deliver(self: Tracker, open_kwargs: Mapping[str, Any]) -> tuple[str, Exception | None]:
        """One pass over the queue, in order; rejected calls are dropped. Returns (last call, error or None)."""
        what = "open run"
        try:
            if not self.run_id:
                self.open(**open_kwargs)
            while self.pending:
                what, call = self.pending[0]
                try:
                    call()
                except Exception as exc:
                    if not _permanent(exc):
                        raise
                    self._drop(what, exc)
                self.pending.pop(0)
            return what, None
        except Exception as exc:  # noqa: BLE001
            return what, exc

    def finish(self: Tracker, *, status: str = "", timeout_s: float = 60.0, **open_kwargs) -> str:
        """Deliver everything (waiting up to ``timeout_s`` for a server that is coming back) and optionally end
        the run. Returns "" on success, or a one-paragraph report of what could not be logged."""
        if status:
            self._send("end run", lambda: self.client.set_terminated(self.run_id, status))
        if self.flush(timeout_s=timeout_s, **open_kwargs):
            if self._staging:
                shutil.rmtree(self._staging, ignore_errors=True)
                self._staging = None
            return ""
        lost = sorted({what for what, _ in self.pending})
        check = "that the store's folder exists, is writable and has free space" if \
            self.tracking_uri.startswith(("sqlite:", "file:")) else "the server and MLFLOW_TRACKING_* credentials"
        return self._redact(
            f"MLflow tracking incomplete: {len(self.pending)} call(s) not delivered ({', '.join(lost)}) to "
            f"{self.tracking_uri}. The step's outputs are complete in the pipeline's artifacts; "
            f"check {check}. Last error: {self.errors[-1] if self.errors else '-'}"
        )
