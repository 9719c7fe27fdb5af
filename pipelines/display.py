"""Rich renderings shared by the CLI commands (kept out of the pipeline stages themselves)."""

from __future__ import annotations

from rich.table import Table

from pipelines.tune.sweep import SweepOutcome

SWEEP_COLUMNS = ("mechanism", "memory_size", "forget_threshold", "state_bytes", "val_accuracy")


def sweep_table(outcome: SweepOutcome, metric: str = "val_accuracy") -> Table:
    """One row per trial, best first."""
    table = Table(title="sweep results (best first)")
    for column in SWEEP_COLUMNS:
        table.add_column(column, justify="left" if column == "mechanism" else "right")
    for _, row in outcome.table.sort_values(metric, ascending=False).iterrows():
        table.add_row(
            *[f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in SWEEP_COLUMNS]
        )
    return table
