"""Human review of base vs tuned answers: the evaluation's answers shown as blinded pairs in shuffled order, each
preference recorded on the evaluation's MLflow run, and the tuned model's win rate.

The reviewer sees "answer A" and "answer B" per question; which is the tuned model's is drawn at random per
question (seeded) and revealed only in the recorded table. Preferences go to the run as a table
(``review/preferences-<reviewer>.json``: question, choice, winner, note) and metrics (``review.tuned_win_rate``:
tuned wins plus half the ties over all judged pairs; ``review.tuned_wins``, ``review.base_wins``, ``review.ties``),
so ``kubetune compare`` and the MLflow UI show the win rate beside the automatic metrics.
"""

from __future__ import annotations

import json
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kubetune.errors import KubetuneError
from kubetune.secrets import redact, secret_values

ANSWERS_TABLE = "eval/answers.json"
WIN_RATE_METRIC = "review.tuned_win_rate"
Choice = Literal["a", "b", "tie"]
CHOICES: tuple[str, ...] = ("a", "b", "tie")


@dataclass(frozen=True)
class Pair:
    """One question as the reviewer sees it; ``tuned_is`` stays hidden until the preferences are saved."""

    number: int  # 1-based, in review order
    kind: str
    prompt: str
    reference: str
    a: str
    b: str
    tuned_is: Literal["a", "b"]

    def winner(self, choice: Choice) -> str:
        """``tuned``, ``base`` or ``tie`` for the reviewer's ``choice``."""
        if choice == "tie":
            return "tie"
        return "tuned" if choice == self.tuned_is else "base"


def blinded_pairs(rows: list[dict], seed: int = 0) -> list[Pair]:
    """The answers table's rows (prompt, base_answer, tuned_answer, ...) as pairs in shuffled order, each with the
    tuned answer on a random side."""
    rng = random.Random(seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    pairs = []
    for number, index in enumerate(order, start=1):
        row = rows[index]
        tuned_is = "a" if rng.random() < 0.5 else "b"
        base, tuned = str(row.get("base_answer", "")), str(row.get("tuned_answer", ""))
        a, b = (tuned, base) if tuned_is == "a" else (base, tuned)
        pairs.append(Pair(number, str(row.get("kind", "")), str(row.get("prompt", "")),
                          str(row.get("reference", "") or ""), a, b, tuned_is))
    return pairs


def win_rate(winners: list[str]) -> float:
    """Tuned wins plus half the ties, over all judged pairs (0.5 = no preference either way)."""
    if not winners:
        return float("nan")
    return (winners.count("tuned") + 0.5 * winners.count("tie")) / len(winners)


class ReviewSession:
    """A reviewer's pass over one evaluation run: ``pairs``, then :meth:`record` per judged pair, then :meth:`save`."""

    def __init__(self, tracking_uri: str, run_id: str, *, reviewer: str = "reviewer", seed: int = 0):
        from mlflow.tracking import MlflowClient

        if not re.fullmatch(r"[\w.-]{1,64}", reviewer):
            raise KubetuneError(f"reviewer name {reviewer!r} is not a short word",
                                "use letters, digits, '.', '-' or '_' (it names the recorded table)")
        self.client, self.run_id, self.reviewer = MlflowClient(tracking_uri), run_id, reviewer
        self.pairs = blinded_pairs(self._answers(), seed)
        self.choices: dict[int, tuple[Choice, str]] = {}

    def _answers(self) -> list[dict]:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = self.client.download_artifacts(self.run_id, ANSWERS_TABLE, tmp)
                table = json.loads(Path(path).read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - MLflow raises several types for a missing run or artifact
            raise KubetuneError(f"run {self.run_id} has no {ANSWERS_TABLE} to review ({str(exc)[:200]})",
                                "pass the MLflow run id of an evaluation (the evaluate step logs the answers)") from None
        rows = [dict(zip(table["columns"], values, strict=True)) for values in table["data"]]
        if not rows:
            raise KubetuneError(f"run {self.run_id} has no answers to review", "evaluate with generation samples")
        return rows

    def record(self, number: int, choice: str, note: str = "") -> None:
        """The reviewer's preference for pair ``number``: ``a``, ``b`` or ``tie``, with an optional note."""
        choice = choice.strip().lower()
        if choice not in CHOICES:
            raise KubetuneError(f"preference {choice!r} is not one of {', '.join(CHOICES)}",
                                "answer a (first answer), b (second answer) or tie")
        if not 1 <= number <= len(self.pairs):
            raise KubetuneError(f"there is no pair {number}", f"pairs are numbered 1 to {len(self.pairs)}")
        self.choices[number] = (choice, note)  # type: ignore[assignment]

    def save(self) -> dict[str, float]:
        """Log the preferences (table and metrics) on the run; returns the metrics."""
        import pandas as pd

        if not self.choices:
            raise KubetuneError("no preferences recorded", "record at least one pair before saving")
        secrets = secret_values()
        table, winners = [], []
        for number, (choice, note) in sorted(self.choices.items()):
            pair = self.pairs[number - 1]
            winners.append(pair.winner(choice))
            table.append({"pair": number, "kind": pair.kind, "prompt": redact(pair.prompt, secrets),
                          "choice": choice, "tuned_was": pair.tuned_is, "winner": winners[-1],
                          "note": redact(note, secrets), "reviewer": self.reviewer})
        metrics = {WIN_RATE_METRIC: win_rate(winners), "review.tuned_wins": float(winners.count("tuned")),
                   "review.base_wins": float(winners.count("base")), "review.ties": float(winners.count("tie")),
                   "review.pairs": float(len(winners))}
        self.client.log_table(self.run_id, pd.DataFrame(table), f"review/preferences-{self.reviewer}.json")
        for key, value in metrics.items():
            self.client.log_metric(self.run_id, key, value)
        self.client.set_tag(self.run_id, "kubetune.reviewed_by", self.reviewer)
        return metrics
