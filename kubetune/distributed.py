"""Data-parallel training in one pod: the SFT step on every GPU the step was given, through torchrun.

:func:`train` takes the arguments of :func:`kubetune.steps.train` plus ``nproc``. With one process it calls
``steps.train`` here, in this process. With more it writes the arguments to a file and re-executes the step under
``python -m torch.distributed.run`` (torchrun): one process per GPU, rendezvous on localhost, NCCL on CUDA and
gloo on the CPU. Every rank loads the 4-bit model onto its own GPU (``LOCAL_RANK``) and TRL's trainer wraps it in
DDP; rank 0 alone logs to MLflow, saves checkpoints and writes the adapter and the result that this process
returns. A failure on any rank fails the step with that rank's error.

Already inside torchrun (``LOCAL_RANK`` set, e.g. as the entrypoint of a Kubeflow Trainer TrainJob), the step
runs in-process as the rank it was started as, whatever ``nproc`` says.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.errors import KubetuneError
from kubetune.storage import atomic_file

log = logging.getLogger("kubetune")

RESULT_FILE = "result.json"
SPEC_FILE = "job.json"
_ERROR_FILE = "error-rank{rank}.json"


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the torch.distributed environment)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_rank_zero() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def resolve_nproc(requested: int) -> int:
    """Processes to start: ``0`` = one per visible GPU (1 without a GPU). More processes than GPUs is an error."""
    if requested < 0:
        raise KubetuneError(f"num_gpus={requested} is negative", "use 0 (every visible GPU), 1, 2, ...")
    gpus = visible_gpus()
    if requested == 0:
        return max(gpus, 1)
    if gpus and requested > gpus:
        raise KubetuneError(
            f"num_gpus={requested} processes were asked for, but this pod sees {gpus} GPU(s)",
            "request as many GPUs as processes (the step's accelerator count sets both in the pipeline), or lower "
            "num_gpus; MIG slices cannot be combined: use one slice and num_gpus=1",
        )
    if not gpus and requested > 1:
        log.warning("no GPU: %d processes train on the CPU (gloo); meant for tests", requested)
    return requested


def runs_in_process(nproc: int) -> bool:
    """One process that sees at most one GPU trains in this process; anything else goes through torchrun. A single
    process that sees several GPUs must too: the Trainer would wrap the model in nn.DataParallel, which SFTTrainer
    refuses; a torchrun rank uses only its own GPU."""
    return nproc == 1 and visible_gpus() <= 1


def torchrun_command(nproc: int, target: list[str]) -> list[str]:
    """``python -m torch.distributed.run`` on this machine only: ``nproc`` workers, rendezvous on localhost
    (a free port), no restarts (a retry of the step resumes from its checkpoint instead)."""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}", "--max-restarts=0",
        *target,
    ]


def child_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: this process's, passed through unchanged (credentials, HF_HOME, NCCL and
    symmetric-memory settings such as NCCL_NVLS_ENABLE=0 / TORCH_SYMM_MEM_DISABLE_MULTICAST=1), plus defaults
    torchrun would otherwise warn about."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def max_across_ranks(values: list[int]) -> list[int]:
    """Each value's maximum over the ranks of the initialised process group (the values as they are when there is
    none, or one rank). Every rank must call it at the same point: it is one all-reduce."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor(values, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [int(value) for value in tensor.tolist()]


SHUTDOWN_TIMEOUT_S = 300
"""How long torchrun waits for its workers after passing on SIGTERM (they save a checkpoint) before SIGKILL."""


def run_torchrun(nproc: int, target: list[str], *, error_dir: str | Path) -> None:
    """Run ``target`` (``-m module args`` or ``script.py args``) under torchrun and wait for every rank.

    Workers that fail write ``error-rank<N>.json`` into ``error_dir`` (see :func:`record_errors`); a non-zero exit
    raises one :class:`KubetuneError` naming the failed ranks and their errors. SIGTERM and Ctrl-C are passed on
    to torchrun, which stops the workers.
    """
    command = torchrun_command(nproc, target)
    env = child_env()
    env["KUBETUNE_ERROR_DIR"] = str(error_dir)
    log.info("launching %d processes: %s", nproc, " ".join(command))
    # torchrun's own session: a pod's SIGTERM reaches it once, through this launcher, not twice (the process
    # group's and ours); and it gives its workers the time of a checkpoint save before it kills them.
    env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))
    process = subprocess.Popen(command, env=env, start_new_session=True)
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        process.send_signal(signum)

    forwarding = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, forward) if forwarding else None
    try:
        code = process.wait()
    except KeyboardInterrupt:
        process.send_signal(signal.SIGINT)
        code = process.wait()
        raise
    finally:
        if forwarding:
            signal.signal(signal.SIGTERM, previous)
    if code != 0 and received:  # the ranks saved a checkpoint and stopped: the step ends as a stopped process
        raise SystemExit(128 + received[0])
    if code != 0:
        raise _failure(nproc, code, Path(error_dir))


def _failure(nproc: int, code: int, error_dir: Path) -> KubetuneError:
    errors = sorted(
        (json.loads(path.read_text(encoding="utf-8")) for path in error_dir.glob(_ERROR_FILE.format(rank="*"))),
        key=lambda error: error["rank"],
    )
    if not errors:
        return KubetuneError(
            f"distributed training failed: torchrun exited with {code} and no rank of {nproc} reported an error "
            "(a worker was killed, e.g. out of host memory, or failed to start)",
            "see the torchrun and worker log above; raise the step's memory or lower num_gpus",
        )
    ranks = ", ".join(str(error["rank"]) for error in errors)
    first = errors[0]
    if first.get("fix"):  # a KubetuneError: the same problem on every rank, as a rule
        return KubetuneError(f"rank {ranks} of {nproc} failed: {first['problem']}", first["fix"])
    return KubetuneError(
        f"distributed training failed on rank {ranks} of {nproc}: {first['type']}: {first['message']}",
        f"see rank {first['rank']}'s traceback above in this log",
    )


class record_errors:  # noqa: N801 - used as `with record_errors():`
    """In a worker: write the exception of this rank to ``$KUBETUNE_ERROR_DIR/error-rank<RANK>.json`` for the
    launcher's message, then let it propagate (torchrun prints it and stops the other ranks)."""

    def __enter__(self) -> record_errors:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        directory = os.environ.get("KUBETUNE_ERROR_DIR")
        if exc is None or not directory or isinstance(exc, (SystemExit, KeyboardInterrupt)):
            return False
        rank = int(os.environ.get("RANK", "0"))
        record = {"rank": rank, "type": type(exc).__name__, "message": str(exc)[:2000],
                  "traceback": "".join(traceback.format_exception(exc_type, exc, tb))[-8000:]}
        if isinstance(exc, KubetuneError):
            record.update(problem=exc.problem, fix=exc.fix)
        Path(directory, _ERROR_FILE.format(rank=rank)).write_text(json.dumps(record), encoding="utf-8")
        return False


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# -- launching a step ------------------------------------------------------------------------------------------
def launch(spec_json: str, nproc: int, module: str) -> dict[str, Any]:
    """Run ``python -m <module> WORK_DIR`` on ``nproc`` ranks with ``spec_json`` in ``WORK_DIR/job.json``; returns
    the result rank 0 wrote (see :func:`worker_main`)."""
    with tempfile.TemporaryDirectory(prefix="kubetune-ddp-") as work:
        Path(work, SPEC_FILE).write_text(spec_json, encoding="utf-8")
        run_torchrun(nproc, ["-m", module, work], error_dir=work)
        result = Path(work, RESULT_FILE)
        if not result.is_file():
            raise KubetuneError("distributed training ended without rank 0's result",
                                "see the worker log above; rank 0 writes the result after saving the adapter")
        return json.loads(result.read_text(encoding="utf-8"))


def worker_main(argv: list[str], run: Callable[[str], dict[str, Any]], module: str) -> int:
    """One rank's entry, ``torchrun ... -m <module> WORK_DIR``: ``run`` gets the job's JSON and returns the
    result, which rank 0 writes for :func:`launch`. A clear error ends the rank with exit code 2."""
    if len(argv) != 1 or not under_torchrun():
        print(f"usage: torchrun ... -m {module} WORK_DIR (started by kubetune.distributed.launch)", file=sys.stderr)
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{os.environ.get('RANK')} %(levelname)s "
                            "%(name)s: %(message)s")
    try:
        with record_errors():
            result = run(Path(argv[0], SPEC_FILE).read_text(encoding="utf-8"))
            if is_rank_zero():
                with atomic_file(Path(argv[0], RESULT_FILE)) as staging:
                    Path(staging).write_text(json.dumps(result, ensure_ascii=False, default=str), encoding="utf-8")
    except KubetuneError as exc:  # a clear message, no traceback; the launcher repeats it once
        print(f"kubetune: error (rank {os.environ.get('RANK')}): {exc}", file=sys.stderr, flush=True)
        return 2
    # On success only: with a failed rank, collectives may never complete; torchrun stops the others.
    destroy_process_group()
    return 0
