"""The continual accuracy matrix R and its summaries: final average and forgetting.

R is a list of rows: R[t][i] = a metric on task i's test set after training task t (0-indexed),
None where task i was not seen yet (i > t) or the metric is undefined (e.g. no masks). The joint
baseline has a single row. Functions work on any number of finished rows (a partial sequence).
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

Matrix = list[list[float | None]]


def is_figure(v) -> bool:
    """A finite real number (numpy's too: np.float32 counts), never a bool; None and NaN are not."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def make_row(num_tasks: int, values: dict[int, float | None]) -> list[float | None]:
    """A row of length num_tasks with values at the given task indices, None elsewhere."""
    return [values.get(i) for i in range(num_tasks)]


def final_average(R: Sequence[Sequence[float | None]]) -> float | None:
    """Mean over tasks of the last row: ACC = (1/n) sum_i R[T-1][i], None entries skipped.

    None if there is no row or no defined entry in the last row.
    """
    if not R:
        return None
    vals = [float(v) for v in R[-1] if is_figure(v)]
    return sum(vals) / len(vals) if vals else None


def forgetting_per_task(R: Sequence[Sequence[float | None]]) -> list[float | None]:
    """f_i = max_{t in [i, T-2]} R[t][i] - R[T-1][i] for i in 0..T-2 (T = number of rows).

    The best value task i ever had before the last training step minus its value at the end
    (Chaudhry et al., 2018). Entries whose values are undefined give None.
    """
    n = len(R)
    out: list[float | None] = []
    for i in range(max(0, n - 1)):
        last = R[n - 1][i] if i < len(R[n - 1]) else None
        before = [float(R[t][i]) for t in range(i, n - 1) if i < len(R[t]) and is_figure(R[t][i])]
        out.append(max(before) - float(last) if before and is_figure(last) else None)
    return out


def forgetting(R: Sequence[Sequence[float | None]]) -> float | None:
    """Forgetting measure FM = 1/(T-1) sum_{i=0}^{T-2} [max_{t in [i, T-2]} R[t][i] - R[T-1][i]].

    T = number of rows (tasks trained so far). The last task cannot have been forgotten, so it is
    left out. None with fewer than two rows (e.g. the joint baseline) or no defined term;
    undefined terms (None entries) are skipped in the mean.
    """
    terms = [f for f in forgetting_per_task(R) if f is not None]
    return sum(terms) / len(terms) if terms else None


def summarize(matrices: dict[str, Matrix]) -> dict[str, float | None]:
    """{final_<metric>: final_average, forgetting_<metric>: forgetting} for every matrix."""
    out: dict[str, float | None] = {}
    for name, R in matrices.items():
        out[f"final_{name}"] = final_average(R)
        out[f"forgetting_{name}"] = forgetting(R)
    return out


def with_categories(figures: dict, records: list[dict]) -> dict:
    """A task's evaluation with each category's figures where the task groups several (image metrics
    from the score rows, pixel metrics from ``pixel_by_category``): ``by_category`` as a single
    run's results.json has it, its "mean" the mean over the task's categories."""
    from adtrain.metrics.image import by_category

    out = {k: v for k, v in figures.items() if k != "pixel_by_category"}
    grouped = by_category(records, figures.get("pixel_by_category"))
    if grouped:
        out["by_category"] = grouped
    return out


def category_mean(evaluations: Sequence[dict], keys: Sequence[str]) -> dict | None:
    """The last row's figures per category, every category weighing the same (the multi-class
    protocols' figure, IUF's: a task of ten categories counts ten times, not once as in the final
    average over tasks), and their mean under "mean" (undefined figures skipped, as the final
    average does). None where no task groups several categories (it equals the final average)."""
    if not any(e.get("by_category") for e in evaluations):
        return None
    per: dict[str, dict] = {}
    for e in evaluations:
        grouped = e.get("by_category")
        if grouped:
            per.update({c: {k: f.get(k) for k in keys} for c, f in grouped.items() if c != "mean"})
        else:
            per[e["name"]] = {k: e.get(k) for k in keys}
    means = {}
    for k in keys:
        vals = [float(f[k]) for f in per.values() if is_figure(f.get(k))]
        means[k] = sum(vals) / len(vals) if vals else None
    return {**per, "mean": means}
