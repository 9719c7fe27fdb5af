"""`memlab`: the command-line entry point. Each subcommand is a thin shell over a pipeline stage."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="memlab",
    help="Train, compare, tune and serve memory architectures for sequence models on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
console = Console()


@app.command()
def zoo(
    kinds: Annotated[
        list[str] | None, typer.Option("--kind", "-k", help="Mechanism to include (repeatable).")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens streamed per sequence.")] = 256,
    segment_len: Annotated[int, typer.Option(min=1, help="Tokens per forward call.")] = 64,
    d_model: Annotated[int, typer.Option(min=8)] = 64,
    memory_size: Annotated[int, typer.Option(min=1)] = 32,
) -> None:
    """Build every registered mechanism, stream a batch through it in segments, compare costs."""
    from pipelines.zoo import ZooSettings, run_zoo

    settings = ZooSettings(
        batch_size=batch_size,
        seq_len=seq_len,
        segment_len=segment_len,
        d_model=d_model,
        memory_size=memory_size,
    )
    table = Table(title=f"memlab zoo: B={batch_size}, T={seq_len} in segments of {segment_len}")
    for column in ("mechanism", "parameters", "state bytes/seq", "live entries", "tokens/s"):
        table.add_column(column, justify="left" if column == "mechanism" else "right")
    with console.status("streaming through the zoo...") as status:

        def show(row) -> None:
            status.update(f"done {row.kind}; next...")
            table.add_row(
                row.kind,
                f"{row.parameters:,}",
                f"{row.state_bytes_per_sequence:,}",
                f"{row.live_entries:.1f}",
                f"{row.tokens_per_second:,.0f}",
            )

        try:
            run_zoo(settings, kinds, on_done=show)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--kind") from error
    console.print(table)


@app.command()
def prep(
    task: Annotated[
        str | None,
        typer.Option(help="Task kind: mqar, forgetting_mqar, copy, selective_copy or text."),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--override", "-o", help="key=value into the data config, dotted (task.vocab_size=64)."
        ),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where prepared data is cached.")] = None,
) -> None:
    """Prepare a data set with Ray Data (or reuse the cache); print where it went and its size."""
    from pipelines.data import DataError
    from pipelines.data.build import build_datasets
    from pipelines.data.config import config_from_overrides

    try:
        config = config_from_overrides(task, overrides, cache_dir)
        with console.status("preparing data...") as status:
            prepared = build_datasets(config, progress=status.update)
    except DataError as error:
        raise typer.BadParameter(str(error), param_hint="--task/--override") from error
    meta = prepared.metadata
    state = "reused from cache" if prepared.cached else "written"
    console.print(f"[bold]{config.task.kind}[/bold] data {state} at {prepared.path}")
    console.print(
        f"train {meta.train_rows:,} rows x {meta.train_seq_len} tokens, "
        f"test {meta.test_rows:,} rows x {meta.test_seq_len} tokens "
        f"({meta.dropped_test_rows:,} test rows dropped as repeats of training rows), "
        f"vocabulary {meta.vocab_size:,}, {meta.bytes:,} bytes on disk"
    )


@app.command()
def train(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides: model.memory.memory_size=64 train.lr=1e-3"),
    ] = None,
    recipe: Annotated[
        str, typer.Option("--recipe", "-r", help="Starting config; see `memlab recipes`.")
    ] = "debug-gru",
    name: Annotated[
        str | None, typer.Option(help="Run name; the same name resumes that run.")
    ] = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address; default: a local Ray.")
    ] = None,
) -> None:
    """Train one model with Ray Train from a recipe plus overrides; logs to MLflow."""
    from pipelines.experiment import OverrideError, apply_overrides
    from pipelines.recipes import recipe as load_recipe

    try:
        config = apply_overrides(load_recipe(recipe), list(overrides or []))
        if name:
            config = apply_overrides(config, {"run.name": name})
        config.data.check()
    except (OverrideError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="OVERRIDES/--recipe") from error
    from pipelines.train.driver import TrainingError
    from pipelines.train.session import run_training

    try:
        outcome = run_training(config, ray_address=ray_address, console=console)
    except TrainingError as error:
        console.print(f"[bold red]error:[/bold red] {error}")
        raise typer.Exit(1) from None
    shown = {k: round(v, 4) for k, v in outcome.metrics.items() if k.startswith("val_")}
    console.print(
        f"[bold green]done[/bold green] {config.run_name}: {shown}\n"
        f"MLflow run {outcome.run_id} ({config.tracking.resolved_uri()})\n"
        f"checkpoint {outcome.checkpoint_path}\nmodel {outcome.model_uri}"
    )


@app.command()
def tune(
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides of the base config.")
    ] = None,
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Base config.")] = "mqar-small",
    kinds: Annotated[
        list[str] | None, typer.Option("--kind", "-k", help="Mechanism to include (repeatable).")
    ] = None,
    memory_sizes: Annotated[
        list[int] | None, typer.Option("--memory-size", "-m", help="Grid value (repeatable).")
    ] = None,
    thresholds: Annotated[
        list[float] | None, typer.Option("--threshold", "-t", help="Grid value (repeatable).")
    ] = None,
    space: Annotated[
        str | None,
        typer.Option(help='More dimensions as JSON: {"train.lr": {"loguniform": [1e-4, 1e-2]}}'),
    ] = None,
    name: Annotated[str, typer.Option(help="Sweep name (also its MLflow parent run).")] = "sweep",
    scheduler: Annotated[str, typer.Option(help="asha or fifo.")] = "asha",
    search: Annotated[str, typer.Option(help="grid, random or optuna.")] = "grid",
    num_samples: Annotated[int, typer.Option(min=1)] = 1,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted sweep of this name.")
    ] = False,
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address.")] = None,
) -> None:
    """Search mechanism x memory size x forget threshold with Ray Tune; register the champion."""
    import json

    from pipelines.experiment import OverrideError, apply_overrides
    from pipelines.recipes import recipe as load_recipe
    from pipelines.tune.space import SpaceError
    from pipelines.tune.sweep import SweepSettings, run_sweep

    raw_space = json.loads(space) if space else {}
    for key, values in (
        ("model.memory.kind", kinds),
        ("model.memory.memory_size", memory_sizes),
        ("model.memory.forget_threshold", thresholds),
    ):
        if values:
            raw_space = {key: {"grid": list(values)}} | raw_space
    try:
        base = apply_overrides(load_recipe(recipe), list(overrides or []))
        base.data.check()
        settings = SweepSettings(
            name=name, scheduler=scheduler, search=search, num_samples=num_samples
        )
        from pipelines.train.session import local_ray

        local_ray(ray_address)
        with console.status(f"sweep {name}: trials running (Ray Tune)..."):
            outcome = run_sweep(base, raw_space, settings, resume=resume)
    except (OverrideError, SpaceError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--space/--kind/OVERRIDES") from error
    _print_sweep(outcome)


def _print_sweep(outcome) -> None:
    table = Table(title="sweep results (best first)")
    columns = ["mechanism", "memory_size", "forget_threshold", "state_bytes", "val_accuracy"]
    for column in columns:
        table.add_column(column, justify="left" if column == "mechanism" else "right")
    for _, row in outcome.table.sort_values("val_accuracy", ascending=False).iterrows():
        table.add_row(
            *[f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        )
    console.print(table)
    console.print(f"results: {outcome.table_path}")
    for path in outcome.plot_paths:
        console.print(f"plot: {path}")
    if outcome.champion:
        console.print(
            f"[bold green]champion[/bold green] {outcome.champion['uri']} "
            f"(version {outcome.champion_version}, {outcome.champion['mechanism']})"
        )


@app.command()
def recipes() -> None:
    """List the recipes `memlab train --recipe` and `memlab tune --recipe` start from."""
    from pipelines.recipes import RECIPES

    for recipe_name, make in sorted(RECIPES.items()):
        config = make()
        console.print(
            f"{recipe_name:24} {config.model.memory.kind:15} task={config.data.task.kind} "
            f"epochs={config.train.epochs} workers={config.scaling.num_workers}"
        )


@app.command()
def run() -> None:
    """The main job on the embedded default (local Ray, local MLflow). For now: the zoo smoke."""
    zoo(kinds=None)


if __name__ == "__main__":
    app()
