"""Two prediction files of one data file, compared: `setok eval TASK --data D --pred A --against B`.

Each `harness.eval_*` task can fill a `Tally`: per scored item (a question, a caption, an
expression, an image) the numerator and denominator it adds to each metric, so that the metric
is sum(num) / sum(den) over the items (a mean is num = value, den = 1; a micro average such as
caption recall is num = facts found, den = facts true). `paired_bootstrap` resamples the items
(the same draw for both files, so the comparison is paired) and gives A - B of every metric
with its percentile interval.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

from ..errors import UserError

COMPARED = ("vqa", "caption", "segment", "generate", "edit")      # the tasks scored from prediction files


class Tally:
    """Per item (num, den) of each metric. `n`: the number of items (set by the task)."""

    def __init__(self):
        self.n = 0
        self._rows: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0]))

    def add(self, metric: str, item: int, num: float, den: float = 1.0) -> None:
        row = self._rows[metric][item]
        row[0] += float(num)
        row[1] += float(den)

    def arrays(self) -> dict[str, np.ndarray]:
        """metric -> (n, 2) float64 [num, den] per item (items that never added to it: 0, 0)."""
        out = {}
        for metric, rows in self._rows.items():
            a = np.zeros((self.n, 2))
            for i, (num, den) in rows.items():
                a[i] = (num, den)
            out[metric] = a
        return out

    def value(self, metric: str) -> Optional[float]:
        """The metric over all items, as the task reports it."""
        a = self.arrays()[metric]
        den = a[:, 1].sum()
        return float(a[:, 0].sum() / den) if den else None


def paired_bootstrap(a: Tally, b: Tally, resamples: int = 2000, level: float = 0.95, seed: int = 0
                     ) -> dict[str, dict]:
    """metric -> {"a", "b", "diff" (a - b), "lo", "hi" (the `level` percentile interval of the
    difference over `resamples` paired resamples of the items), "items"}, for the metrics both
    tallies hold. The items must be the same ones in the same order (one data file, two
    prediction files)."""
    if a.n != b.n:
        raise UserError(f"the two prediction files score {a.n} and {b.n} items: not the same data")
    if a.n == 0:
        raise UserError("nothing to compare: the data has no items")
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(a.n, np.full(a.n, 1.0 / a.n), size=resamples).astype(np.float64)   # (R, n)
    ta, tb = a.arrays(), b.arrays()
    tail = (1.0 - level) / 2.0
    out = {}
    for metric in sorted(set(ta) & set(tb)):
        A, B = ta[metric], tb[metric]
        if not (A[:, 1].sum() and B[:, 1].sum()):
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            boot = (weights @ A[:, 0]) / (weights @ A[:, 1]) - (weights @ B[:, 0]) / (weights @ B[:, 1])
        boot = boot[np.isfinite(boot)]            # a resample without the metric's items says nothing
        va, vb = float(A[:, 0].sum() / A[:, 1].sum()), float(B[:, 0].sum() / B[:, 1].sum())
        out[metric] = {"a": va, "b": vb, "diff": va - vb, "items": int(((A[:, 1] > 0) | (B[:, 1] > 0)).sum()),
                       "lo": float(np.quantile(boot, tail)) if boot.size else None,
                       "hi": float(np.quantile(boot, 1.0 - tail)) if boot.size else None}
    return out


def compare(task: str, data: str, pred: str, against: str, limit: Optional[int] = None,
            resamples: int = 2000, seed: int = 0) -> dict:
    """Score `pred` and `against` on `data` with `task`'s evaluation -> {"a": its metrics for pred,
    "b": for against, "diff": `paired_bootstrap`}."""
    from . import harness as H

    if task not in COMPARED:
        raise UserError(f"--against compares prediction files: {', '.join(COMPARED)}, not {task}")
    fn = getattr(H, f"eval_{task}")
    ta, tb = Tally(), Tally()
    fa = fn(data, pred, limit=limit, tally=ta)
    fb = fn(data, against, limit=limit, tally=tb)
    return {"a": fa, "b": fb, "diff": paired_bootstrap(ta, tb, resamples=resamples, seed=seed)}
