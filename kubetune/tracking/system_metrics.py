"""System metrics of a run: CPU, memory, disk, network and (with nvidia-ml-py) GPU utilisation and memory, logged
as ``system/*`` metrics through the Tracker's outage-tolerant queue."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubetune.tracking.run import Tracker

log = logging.getLogger("kubetune.tracking")

SYSTEM_METRICS_INTERVAL_S = 10.0  # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides
SYSTEM_METRICS_PREFIX = "system/"


class SystemMetrics:
    """The system-metrics half of :class:`~kubetune.tracking.Tracker` (a mixin)."""

    @contextmanager
    def system_metrics(self: Tracker, sampling_interval_s: float = SYSTEM_METRICS_INTERVAL_S) -> Iterator[Any]:
        """Log CPU, memory, disk, network and (with nvidia-ml-py) GPU utilisation and memory as ``system/*``
        metrics of this run while the block runs, through the same outage-tolerant queue as everything else.
        Never raises: without psutil it logs nothing."""
        monitor = None
        try:
            monitor = _queued_system_monitor(self, sampling_interval_s)
            if not any(type(m).__name__ == "GPUMonitor" for m in monitor.monitors) and _has_cuda():
                log.warning("GPU system metrics off: install nvidia-ml-py to log GPU utilisation and memory")
            monitor.start()
        except Exception as exc:  # noqa: BLE001 - psutil missing: train without them
            log.warning("system metrics off: %s", self._redact(exc))
            monitor = None
        try:
            yield monitor
        finally:
            if monitor is not None:
                try:
                    monitor.finish()
                except Exception as exc:  # noqa: BLE001
                    log.warning("last system metrics not logged: %s", self._redact(exc))

    def _next_system_step(self: Tracker) -> int:
        """A retried step continues the run's system metrics after the last step logged."""
        if not self.run_id:
            return 0
        try:
            metrics = self.client.get_run(self.run_id).data._metric_objs
        except Exception:  # noqa: BLE001
            return 0
        steps = [m.step for m in metrics if m.key.startswith(SYSTEM_METRICS_PREFIX)]
        return max(steps) + 1 if steps else 0


def _queued_system_monitor(tracker: Tracker, sampling_interval_s: float):
    """MLflow's ``SystemMetricsMonitor`` (its CPU, memory, disk, network and GPU probes, and their averaging over
    each interval), publishing through ``tracker``'s queue: an MLflow outage neither stops the sampling, as it
    stops MLflow's own loop, nor loses the samples; and the last, partial interval is logged too."""
    import threading

    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    class QueuedSystemMetrics(SystemMetricsMonitor):
        def start(self) -> None:
            self.step = tracker._next_system_step()
            self.stop_event = threading.Event()
            self.thread = threading.Thread(target=self.monitor, daemon=True, name="kubetune-system-metrics")
            self.thread.start()

        def monitor(self) -> None:
            while not self.stop_event.is_set():
                for _ in range(max(1, int(self.samples_before_logging))):
                    self.collect_metrics()
                    if self.stop_event.wait(float(self.sampling_interval)):
                        return
                self.publish_metrics(self.aggregate_metrics())

        def publish_metrics(self, metrics) -> None:
            if metrics:
                prefix = SYSTEM_METRICS_PREFIX + (f"{self.node_id}/" if self.node_id else "")
                tracker.log_metrics(metrics, step=self.step, prefix=prefix)
                self.step += 1
            for probe in self.monitors:
                probe.clear_metrics()

        def finish(self) -> None:
            self.stop_event.set()
            self.thread.join(timeout=30)
            self.collect_metrics()
            self.publish_metrics(self.aggregate_metrics())

    return QueuedSystemMetrics(tracker.run_id or None, sampling_interval=sampling_interval_s,
                               tracking_uri=tracker.tracking_uri)


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False
