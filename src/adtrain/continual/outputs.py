"""Continual outputs: heatmap PNGs of the matrices, logger scalars, W&B tables and line plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from adtrain.continual.metrics import Matrix, is_figure
from adtrain.continual.state import MATRIX_METRICS
from adtrain.loggers import is_wandb, score_table
from adtrain.viz import figure_png


def row_labels(num_rows: int, task_names: list[str], joint: bool) -> list[str]:
    return ["joint (all tasks)"] if joint else [f"{t}: {task_names[t]}" for t in range(num_rows)]


def plot_matrix(R: Matrix, task_names: list[str], metric: str, path: Path, joint: bool = False,
                subtitle: str = "") -> Path:
    """Annotated heatmap: rows = after training task t, columns = evaluated on task i."""
    import matplotlib
    from matplotlib.figure import Figure

    data = np.array([[v if is_figure(v) else np.nan for v in row] for row in R], dtype=float)
    data = data.reshape(len(R), len(task_names))
    n_rows, n_cols = data.shape
    fig = Figure(figsize=(max(4.0, 0.75 * n_cols + 2.5), max(2.2, 0.5 * n_rows + 1.8)), dpi=100)
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for t in range(n_rows):
        for i in range(n_cols):
            v = data[t, i]
            if np.isfinite(v):
                ax.text(i, t, f"{100 * v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if v < 0.6 else "black")
    tilt = n_cols > 3
    ax.set_xticks(range(n_cols), labels=task_names, rotation=45 if tilt else 0, ha="right" if tilt else "center",
                  fontsize=8)
    ax.set_yticks(range(n_rows), labels=row_labels(n_rows, task_names, joint), fontsize=8)
    ax.set_xlabel("evaluated on task i")
    ax.set_ylabel("after training task t")
    ax.set_title(f"{metric} (x100)" + (f"\n{subtitle}" if subtitle else ""), fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return figure_png(fig, path)


def log_row(logger, t: int, evals: dict[int, dict], task_names: list[str]) -> None:
    """After task t: every seen task's metrics as scalars continual/<metric>/<task>, x = task t."""
    if logger is None:
        return
    scalars: dict[str, float] = {"continual/after_task": t}
    for m in MATRIX_METRICS:
        vals = []
        for i, r in sorted(evals.items()):
            if is_figure(r.get(m)):
                scalars[f"continual/{m}/{task_names[i]}"] = float(r[m])
                vals.append(float(r[m]))
        if vals:
            scalars[f"continual/{m}/mean_seen"] = float(np.mean(vals))
    logger.log_metrics(scalars, step=t)
    logger.save()


def _curves(R: Matrix, task_names: list[str]) -> tuple[list, list, list]:
    xs, ys, keys = [], [], []
    for i, name in enumerate(task_names):
        pts = [(t, R[t][i]) for t in range(len(R)) if is_figure(R[t][i])]
        if pts:
            xs.append([p[0] for p in pts])
            ys.append([float(p[1]) for p in pts])
            keys.append(name)
    return xs, ys, keys


def log_final(logger, results: dict, heatmaps: dict[str, Path], test_heatmaps: dict[str, list[Path]] | None = None,
              records: list[dict] | None = None, checkpoint: Path | None = None) -> None:
    """Summary scalars to any logger; to W&B also a table, a line plot and the heatmap per matrix,
    the final row's test heatmaps per task (``test_heatmaps``: task name -> PNGs), its per-image
    score table (``records``) and the final checkpoint as a model artifact."""
    if logger is None:
        return
    summary = {f"continual/{k}": v for k, v in results["summary"].items() if is_figure(v)}
    if summary:
        logger.log_metrics(summary)
    if is_wandb(logger):
        import wandb

        run = logger.experiment
        names = results["task_names"]
        labels = row_labels(len(next(iter(results["matrices"].values()))), names, results["schedule"]["joint"])
        for m, R in results["matrices"].items():
            table = wandb.Table(columns=["after_task", *names], data=[[labels[t], *row] for t, row in enumerate(R)])
            payload = {f"continual/matrix/{m}": table}
            xs, ys, keys = _curves(R, names)
            if ys:
                payload[f"continual/curve/{m}"] = wandb.plot.line_series(
                    xs=xs, ys=ys, keys=keys, title=f"{m} of each task after each training task", xname="after task")
            if m in heatmaps and Path(heatmaps[m]).exists():
                payload[f"continual/heatmap/{m}"] = wandb.Image(str(heatmaps[m]), caption=m)
            run.log(payload)
        for name, pngs in (test_heatmaps or {}).items():
            if pngs:
                run.log({f"continual/heatmaps/{name}": [wandb.Image(str(p), caption=Path(p).stem) for p in pngs]})
        if records:
            run.log({"continual/scores": score_table(records)})
        if checkpoint is not None and Path(checkpoint).is_file() and getattr(logger, "adtrain_log_checkpoint", True):
            art = wandb.Artifact(name=f"model-{run.id}", type="model", metadata=summary)
            art.add_file(str(checkpoint))
            run.log_artifact(art)
        run.summary.update(summary)
    logger.save()
