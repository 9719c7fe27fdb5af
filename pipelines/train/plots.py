"""Training curves as a PNG: loss on the left, validation accuracy on the right."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and Ray workers
import matplotlib.pyplot as plt

CURVE_KEYS = ["train_loss", "val_loss", "val_accuracy"]


def training_curves(history: dict[str, list[tuple[int, float]]], path: Path) -> Path | None:
    """Plot what `history` holds (`{metric: [(step, value), ...]}`); None when it is empty."""
    if not any(history.values()):
        return None
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if history.get(key):
            steps, values = zip(*history[key], strict=True)
            loss_axis.plot(steps, values, label=key, marker="." if key == "val_loss" else None)
    loss_axis.set(xlabel="optimizer step", ylabel="cross-entropy", title="loss")
    loss_axis.legend()
    if history.get("val_accuracy"):
        steps, values = zip(*history["val_accuracy"], strict=True)
        accuracy_axis.plot(steps, values, marker="o")
    accuracy_axis.set(
        xlabel="optimizer step", ylabel="accuracy", title="validation accuracy", ylim=(0, 1)
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


#: The settings a run may move mid-run, as the worker logs them (MLflow names: `/` becomes `.`).
SCHEDULE_KEYS = ["schedule.memory_size", "schedule.forget_threshold", "schedule.lr"]


def schedules(runs: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path | None:
    """One panel per setting, one step line per run (`{run: {key: [(step, value), ...]}}`): a
    value holds from its step until the next one. None when no run logged any."""
    if not any(any(history.values()) for history in runs.values()):
        return None
    figure, axes = plt.subplots(1, len(SCHEDULE_KEYS), figsize=(5 * len(SCHEDULE_KEYS), 4))
    for axis, key in zip(axes, SCHEDULE_KEYS, strict=True):
        for name, history in runs.items():
            if history.get(key):
                steps, values = zip(*history[key], strict=True)
                axis.step(steps, values, where="post", marker="o", label=name)
        axis.set(xlabel="optimizer step", title=key.removeprefix("schedule."))
        if key.endswith("lr"):
            axis.set_yscale("log")
    axes[0].legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
