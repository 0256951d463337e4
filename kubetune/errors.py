"""The one error type users see: a problem and its fix, reported once."""

from __future__ import annotations


class KubetuneError(Exception):
    """A user-facing error: says what is wrong and how to fix it.

    The CLI and the components print ``str(error)`` and exit non-zero, with no traceback.
    """

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}\n  Fix: {fix}")


def collect(problems: list[tuple[str, str]]) -> None:
    """Raise one error listing every (problem, fix) pair, or do nothing when the list is empty."""
    if not problems:
        return
    if len(problems) == 1:
        raise KubetuneError(*problems[0])
    raise KubetuneError(
        f"{len(problems)} problems:\n" + "\n".join(f"  - {p}" for p, _ in problems),
        "\n".join(f"  - {f}" for _, f in problems),
    )


class clear_errors:  # noqa: N801 - used as `with clear_errors():`
    """Turn a KubetuneError into a one-message exit (status 2) instead of a traceback.

    Steps run under this in components and commands, so the Kubeflow UI log and the terminal end with the
    problem and the fix.
    """

    def __enter__(self) -> clear_errors:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None and isinstance(exc, KubetuneError):
            import sys

            print(f"kubetune: error: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        return False
