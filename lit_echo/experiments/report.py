"""The plot (PNG) and the Markdown table of a grid, made from the rows of ``results.csv``.

Plot: one panel per metric against the online step; per arm the mean over training seeds as a line and the
range over seeds (min to max) as a band, starting from the shared warm start at step 0.
Table: the last evaluated step of each arm (never the best one): mean ± standard deviation over seeds, and for
success rates the 95% interval of that mean from the evaluation noise (task bootstrap per run, combined).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lit_echo.experiments.grid import Arm
from lit_echo.experiments.intervals import interval_of_mean
from lit_echo.experiments.results import WARM_START, Row

PLOT_PANELS = (
    ("heldout_trees_success", "success, unseen trees"),
    ("heldout_tasks_success", "success, unseen task types"),
    ("expert_world_nll", "world NLL, held-out expert buffer (nats/token)"),
    ("own_world_nll", "world NLL, own held-out episodes (nats/token)"),
)

# (column, header, kind): "rate" columns print as percentages with an interval, "value" ones as plain numbers.
TABLE_COLUMNS = (
    ("heldout_trees_success", "success, unseen trees", "rate"),
    ("heldout_tasks_success", "success, unseen task types", "rate"),
    ("heldout_trees_valid_action_rate", "valid commands (trees)", "percent"),
    ("expert_world_nll", "world NLL, expert buffer", "value"),
    ("expert_world_acc", "world top-1, expert buffer", "value"),
    ("own_world_nll", "world NLL, own episodes", "value"),
)


def _values(rows: Sequence[Row], column: str) -> np.ndarray:
    return np.asarray([float(r[column]) for r in rows], dtype=np.float64)


def series(rows: Sequence[Row], arm: str, column: str) -> list[tuple[int, float, float, float, int]]:
    """``(step, mean, min, max, seeds)`` of ``column`` for ``arm`` at every evaluated step, the warm start first.
    NaN values (e.g. an NLL over no tokens) are left out."""
    points = []
    warm = [r for r in rows if r["arm"] == WARM_START]
    by_step: dict[int, list[Row]] = {0: warm} if warm else {}
    for r in rows:
        if r["arm"] == arm:
            by_step.setdefault(int(r["step"]), []).append(r)
    for step in sorted(by_step):
        values = _values(by_step[step], column)
        values = values[np.isfinite(values)]
        if len(values):
            points.append((step, float(values.mean()), float(values.min()), float(values.max()), len(values)))
    return points


def last_step_rows(rows: Sequence[Row], arm: str) -> list[Row]:
    """Rows of ``arm`` at its last evaluated step (one per training seed that reached it)."""
    mine = [r for r in rows if r["arm"] == arm]
    if not mine:
        return []
    last = max(int(r["step"]) for r in mine)
    return [r for r in mine if int(r["step"]) == last]


def _cell(rows: Sequence[Row], column: str, kind: str) -> str:
    values = _values(rows, column)
    finite = values[np.isfinite(values)]
    if not len(finite):
        return "n/a"
    scale, digits = (1.0, 3) if kind == "value" else (100.0, 1)
    text = f"{scale * finite.mean():.{digits}f}"
    if len(finite) > 1:
        text += f" ± {scale * finite.std(ddof=1):.{digits}f}"
    if kind == "rate":
        low, high = interval_of_mean(values, _values(rows, column + "_low"), _values(rows, column + "_high"))
        if math.isfinite(low):
            text += f" [{scale * max(low, 0.0):.1f}, {scale * min(high, 1.0):.1f}]"
    return text


def markdown_table(rows: Sequence[Row], arms: Sequence[Arm]) -> str:
    """One row for the warm start and one per arm (its last step); empty cells for arms not evaluated yet."""
    header = ["arm", "runs", "step"] + [title for _, title, _ in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(TABLE_COLUMNS)]
    entries = [(WARM_START, "warm start (shared step 0)")] + [(arm.name, f"{arm.name}: {arm.label}") for arm in arms]
    for name, label in entries:
        chosen = last_step_rows(rows, name)
        if not chosen:
            lines.append("| " + " | ".join([label, "0", "-"] + ["" for _ in TABLE_COLUMNS]) + " |")
            continue
        cells = [label, str(len(chosen)), str(int(chosen[0]["step"]))]
        cells += [_cell(chosen, column, kind) for column, _, kind in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], arms: Sequence[Arm], path: Path, title: str) -> None:
    """Write the PNG of :data:`PLOT_PANELS` (matplotlib, Agg backend: no display needed)."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("the comparison plot needs matplotlib: pip install matplotlib") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, (column, panel_title) in zip(axes.flat, PLOT_PANELS):
        for k, arm in enumerate(arms):
            points = series(rows, arm.name, column)
            if not points:
                continue
            steps, means, lows, highs, _ = map(np.asarray, zip(*points))
            scale = 100.0 if column.endswith("_success") else 1.0
            color = f"C{k}"
            ax.plot(steps, scale * means, marker="o", color=color, label=arm.name)
            ax.fill_between(steps, scale * lows, scale * highs, color=color, alpha=0.15, linewidth=0)
        ax.set_title(panel_title + (" (%)" if column.endswith("_success") else ""))
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[1]:
        ax.set_xlabel("online step")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(handles))
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
