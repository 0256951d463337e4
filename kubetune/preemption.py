"""Stop on SIGTERM with a checkpoint: what a preempted or evicted pod needs.

Kubernetes stops a pod with SIGTERM, waits its ``terminationGracePeriodSeconds`` (30 s unless set) and then
SIGKILLs it. Without a handler, SFT loses every step since its last ``save_steps`` checkpoint. With
:class:`StopOnSignal`, SIGTERM (or Ctrl-C) only sets a flag; at the next optimizer-step boundary the trainer saves
its regular ``checkpoint-N`` (adapter, optimizer, scheduler, trainer state, RNG: what a retry resumes from) and
stops, and the step ends with exit status 128 + signal (:func:`exit_status`: 143 for SIGTERM, 130 for Ctrl-C), so
it is never taken for a success.

transformers' own ``enable_jit_checkpoint`` is not used: it waits 3 s before acting, each torchrun rank decides
alone (a rank that stops while another starts the next step leaves that one waiting in a collective, and rank 0,
the one that writes, may be the one left waiting), and ``train()`` then returns as if training had finished.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from kubetune.distributed import max_across_ranks

log = logging.getLogger("kubetune")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signum: int) -> int:
    """The status of a process ended by signal ``signum``, as shells and Kubernetes report it: 128 + signum."""
    return 128 + signum


class StoppedBySignal(SystemExit):
    """Training stopped on a signal after saving its checkpoint. A SystemExit, so it passes every ``except
    Exception`` and clear-error handler on its way up and the process ends with 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(exit_status(signum))
        self.signum = signum


class StopOnSignal(TrainerCallback):
    """Among the trainer's callbacks, and around ``trainer.train()`` as ``with stop: ...; stop.raise_if_stopped()``:
    the signal handlers live only while training runs, and the previous ones come back afterwards."""

    def __init__(self) -> None:
        self.received = 0  # the first stop signal this process got, 0 for none
        self.stopped_by = 0  # the signal every rank stopped on
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():  # Python sets handlers in the main thread only
            self._previous = {signum: signal.signal(signum, self._receive) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        if self.received and not self.stopped_by and exc[0] is None:
            log.warning("%s came after the last training step: finishing the step", signal.Signals(self.received).name)

    def _receive(self, signum: int, frame: Any) -> None:
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        # Repeats change nothing: a torchrun rank may get SIGTERM from both the pod and torchrun.
        self.received = self.received or signum

    def on_train_begin(self, args, state, control, **kwargs):
        loader = kwargs.get("train_dataloader")
        if loader is not None and getattr(loader, "num_workers", 0):
            # Set before the epoch's iterator forks the workers; skip_first_batches (resume) copies it.
            loader.worker_init_fn = partial(leave_process_group, loader.worker_init_fn)

    def on_step_end(self, args, state, control, **kwargs):
        signum = signal_of_any_rank(self.received)
        # A signal during the last step stops nothing: the adapter is complete and is written as usual.
        if signum and state.global_step < state.max_steps:
            self.stopped_by = signum
            control.should_save = control.should_training_stop = True
            log.warning("%s received: saving checkpoint-%d, then stopping", signal.Signals(signum).name,
                        state.global_step)
        return control

    def raise_if_stopped(self, trainer) -> None:
        """After ``trainer.train()``: when a signal stopped it, wait until rank 0 has written the checkpoint (the
        other ranks would otherwise exit first, and torchrun stop rank 0 mid-save), then end the step."""
        if not self.stopped_by:
            return
        trainer.accelerator.wait_for_everyone()
        if trainer.is_world_process_zero():
            checkpoint = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
            print(f"kubetune: stopped by {signal.Signals(self.stopped_by).name} after saving {checkpoint}; a retry "
                  f"of the step with the same checkpoint_dir resumes from it (exit status "
                  f"{exit_status(self.stopped_by)})", file=sys.stderr, flush=True)
        raise StoppedBySignal(self.stopped_by)


def signal_of_any_rank(signum: int) -> int:
    """The stop signal any rank received, on every rank, so that all stop after the same step.

    Every rank calls this at the same optimizer-step boundary (``on_step_end``), so the all-reduce pairs up. Without
    it, torchrun's ranks, which get SIGTERM at slightly different times, could stop at different steps: one would
    wait forever in the next step's gradient all-reduce. Costs one 4-byte all-reduce per optimizer step.
    """
    return max_across_ranks([signum])[0]


def leave_process_group(init: Callable[[int], None] | None, worker_id: int) -> None:
    """A DataLoader worker's init: leave the trainer's process group, then run the trainer's own init.

    Argo's executor, torchrun and a terminal's Ctrl-C signal the whole process group. A worker killed by that
    SIGTERM fails the trainer's next batch before it can save; out of the group, the worker only hears its own
    process (which still stops it directly), and ends with it.
    """
    os.setpgid(0, 0)
    if init is not None:
        init(worker_id)
