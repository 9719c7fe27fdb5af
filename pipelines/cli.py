"""`memlab`: the command-line entry point. Each subcommand is a thin shell over a pipeline stage.

By default a command shows memlab's own progress and summaries; what Ray and MLflow write goes to
a log file under `memlab_runs/logs/`, named at the end (`pipelines.terminal`). `-v` shows it live.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from pipelines import cli_jobs
from pipelines.runtime import RAY_ADDRESS_HELP

app = typer.Typer(
    name="memlab",
    help="Train, compare, tune and serve memory architectures for sequence models on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    cli_jobs.submit
)
app.add_typer(cli_jobs.jobs_app, name="jobs")
console = Console()

KindsOption = Annotated[
    list[str] | None, typer.Option("--kind", "-k", help="Mechanism to sweep (repeatable).")
]
MemorySizesOption = Annotated[
    list[int] | None, typer.Option("--memory-size", "-m", help="Grid value (repeatable).")
]
ThresholdsOption = Annotated[
    list[float] | None, typer.Option("--threshold", "-t", help="Grid value (repeatable).")
]
RayAddressOption = Annotated[
    str | None, typer.Option("--ray-address", help=RAY_ADDRESS_HELP, show_default=False)
]
VerboseOption = Annotated[
    bool,
    typer.Option(
        "--verbose", "-v", help="Show Ray's and MLflow's own logs live instead of in a log file."
    ),
]


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
    columns = ("mechanism", "parameters", "state bytes/seq", "live entries", "tokens/s")
    for column in (*columns, "threshold acts"):
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
                _threshold_range(row.kind),
            )

        try:
            run_zoo(settings, kinds, on_done=show)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--kind") from error
    console.print(table)


def _threshold_range(kind: str) -> str:
    """Where a kind's forget_threshold changes something (`MemoryConfig.threshold_range`)."""
    from memory_models.registry import REGISTRY

    low_high = REGISTRY[kind].threshold_range
    return "never" if low_high is None else f"{low_high[0]:g}..{low_high[1]:g}"


@app.command()
def prep(
    task: Annotated[
        str | None,
        typer.Option(
            help="Task kind (mqar, forgetting_mqar, copy, selective_copy, text) or a data preset "
            "(zoology-mqar, zoology-iclr24-64/-128/-256)."
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option(
            "--override", "-o", help="key=value into the data config, dotted (task.vocab_size=64)."
        ),
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where prepared data is cached.")] = None,
    ray_address: RayAddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Prepare a data set with Ray Data (or reuse the cache); print where it went and its size."""
    from pipelines.data import DataError
    from pipelines.data.build import build_datasets
    from pipelines.data.config import config_from_overrides
    from pipelines.runtime import VanishingOutputs, refuse_vanishing_outputs

    try:
        config = config_from_overrides(task, overrides, cache_dir)
    except DataError as error:
        raise typer.BadParameter(str(error), param_hint="--task/--override") from error
    try:
        refuse_vanishing_outputs({"the data cache (--cache-dir)": config.cache_dir})
    except VanishingOutputs as error:
        console.print(f"[bold red]error:[/bold red] {error}", highlight=False)
        raise typer.Exit(2) from None
    with (
        _framework_logs("prep", verbose),
        _ray(ray_address),
        console.status("preparing data...") as status,
    ):
        prepared = build_datasets(config, progress=status.update)
    meta = prepared.metadata
    state = "reused from cache" if prepared.cached else "written"
    console.print(f"[bold]{config.task.kind}[/bold] data {state} at {prepared.path}")
    console.print(
        f"train {meta.train_rows:,} rows x {meta.train_seq_len} tokens, "
        f"test {meta.test_rows:,} rows x {meta.test_seq_len} tokens "
        f"({meta.dropped_test_rows:,} test rows dropped as repeats of training rows), "
        f"vocabulary {meta.vocab_size:,}, {meta.bytes:,} bytes on disk"
    )
    if not prepared.cached:
        console.print(f"generated {meta.examples_per_second:,.0f} examples/s")


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
    ray_address: RayAddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Train one model with Ray Train from a recipe plus overrides; logs to MLflow."""
    from pipelines.display import training_progress
    from pipelines.train.driver import TrainingError, planned_steps
    from pipelines.train.driver import train as train_run

    config = _config(recipe, overrides, {"run.name": name} if name else {})
    with _framework_logs("train", verbose), _ray(ray_address):
        uri = config.tracking.resolved_uri()
        with training_progress(console, config.run_name, uri, planned_steps(config)) as follow:
            try:
                outcome = train_run(config, on_run_started=follow)
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
    kinds: KindsOption = None,
    memory_sizes: MemorySizesOption = None,
    thresholds: ThresholdsOption = None,
    acting_thresholds: Annotated[
        int,
        typer.Option(
            min=0,
            help="Instead of -t: threshold 0 and N thresholds inside each kind's own "
            "threshold_range (where its threshold acts; `memlab zoo` lists the ranges).",
        ),
    ] = 0,
    space: Annotated[
        str | None,
        typer.Option(help='More dimensions as JSON: {"train.lr": {"loguniform": [1e-4, 1e-2]}}'),
    ] = None,
    name: Annotated[str, typer.Option(help="Sweep name (also its MLflow parent run).")] = "sweep",
    scheduler: Annotated[
        str,
        typer.Option(help="asha, fifo or pbt (mutates lr, forget_threshold, shape-free sizes)."),
    ] = "asha",
    search: Annotated[str, typer.Option(help="grid, random or optuna.")] = "grid",
    num_samples: Annotated[int, typer.Option(min=1)] = 1,
    max_concurrent_trials: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Trials at once; default: what fits the cluster now (GPUs or cores per trial). "
            "Set it when an autoscaler will add GPU nodes.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted sweep of this name.")
    ] = False,
    ray_address: RayAddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Search mechanism x memory size x forget threshold with Ray Tune; register the champion."""
    from pydantic import ValidationError

    from pipelines.display import sweep_progress, sweep_table
    from pipelines.tune.settings import SweepSettings
    from pipelines.tune.space import (
        SpaceError,
        acting_threshold_space,
        grid_space,
        planned_trials,
    )
    from pipelines.tune.sweep import run_sweep

    base = _config(recipe, overrides)
    if acting_thresholds and thresholds:
        raise typer.BadParameter(
            "give thresholds with -t or ask for --acting-thresholds N, not both",
            param_hint="--threshold/--acting-thresholds",
        )
    try:
        extra = json.loads(space) if space else {}
        if acting_thresholds:
            raw_space = acting_threshold_space(
                base, kinds or (), memory_sizes or (), acting_thresholds, extra
            )
        else:
            raw_space = grid_space(kinds or (), memory_sizes or (), thresholds or (), extra)
        settings = SweepSettings(
            name=name,
            scheduler=scheduler,
            search=search,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent_trials,
        )
    except (json.JSONDecodeError, ValidationError) as error:
        raise typer.BadParameter(str(error), param_hint="--space/--scheduler/--search") from None
    if settings.scheduler == "pbt":
        _check_pbt(base, raw_space)
    total = planned_trials(raw_space, num_samples)
    with _framework_logs("tune", verbose), _ray(ray_address):
        try:
            with sweep_progress(console, name, total, settings.metric, settings.mode) as shown:
                outcome = run_sweep(base, raw_space, settings, resume=resume, callbacks=[shown])
        except (SpaceError, ValueError) as error:
            raise typer.BadParameter(str(error), param_hint="--space/--kind/OVERRIDES") from error
    console.print(sweep_table(outcome))
    console.print(f"results: {outcome.table_path}")
    for path in outcome.plot_paths:
        console.print(f"plot: {path}")
    if outcome.champion:
        console.print(
            f"[bold green]champion[/bold green] {outcome.champion['uri']} "
            f"(version {outcome.champion_version}, {outcome.champion['mechanism']})"
        )


def _check_pbt(base, raw_space: dict) -> None:
    """What PBT would move, checked before Ray starts (a shape-bound size names the kind)."""
    from pipelines.tune.pbt import check_pbt_space
    from pipelines.tune.space import parse_space

    try:
        check_pbt_space(parse_space(raw_space, base), base)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--scheduler pbt/--space/-m") from None


@app.command()
def report(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides of both sweeps' base config: train.epochs=2"),
    ] = None,
    scale: Annotated[
        str, typer.Option(help="gpu (Zoology's sizes), cpu (about an hour on 2 cores) or tiny.")
    ] = "cpu",
    name: Annotated[
        str | None, typer.Option(help="Sweep name (default report-SCALE); NAME-forgetting too.")
    ] = None,
    from_sweep: Annotated[
        str | None, typer.Option(help="Read the sweeps NAME and NAME-forgetting; run nothing.")
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue interrupted sweeps of this name.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan (trials, steps, hours); no Ray.")
    ] = False,
    grace_period: Annotated[
        int | None,
        typer.Option(min=1, help="ASHA: epochs before a trial may stop; default: the scale's."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Report folder; default memlab_runs/reports/NAME.")
    ] = None,
    ray_address: RayAddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Zoology's recall-against-state-size report: sweep mechanism x memory size x d_model on
    MQAR (and forget threshold on forgetting-MQAR) with Ray Tune, then write frontier.png, the
    per-configuration and forgetting tables and report.md, logged to the sweep's MLflow run."""
    from pydantic import ValidationError

    from pipelines.experiment import OverrideError
    from pipelines.report.collect import MissingSweep
    from pipelines.report.plan import ScaleDoesNotFit
    from pipelines.report.run import ReportSettings, SweepInterrupted
    from pipelines.report.run import dry_run as plan_report

    try:
        settings = ReportSettings(
            scale=scale,
            name=name,
            from_sweep=from_sweep,
            resume=resume,
            overrides=tuple(overrides or ()),
            grace_period=grace_period,
            out=out,
        )
        plan = plan_report(settings)  # checks the scale, the overrides and every grid point
    except (ValidationError, OverrideError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--scale/OVERRIDES") from None
    for line in plan:
        console.print(line, markup=False, highlight=False)
    if dry_run:
        return
    try:
        outcome = _run_report(settings, ray_address, verbose)
    except (ScaleDoesNotFit, MissingSweep, SweepInterrupted) as error:
        console.print(f"[bold red]error:[/bold red] {error}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"[bold green]report[/bold green] {outcome.report}")
    console.print(f"files: {', '.join(path.name for path in outcome.files)}")
    if outcome.parent_run_id:
        console.print(f"logged to MLflow run {outcome.parent_run_id} (artifacts under report/)")


def _run_report(settings, ray_address: str | None, verbose: bool):
    """Both sweeps on Ray with a progress bar each, or only the reading with --from-sweep."""
    import ray

    from pipelines.display import sweep_progress
    from pipelines.report.run import run_report

    def progress(sweep: str, total: int | None):
        return _callbacks(sweep_progress(console, sweep, total, "val_accuracy", "max"))

    if settings.from_sweep:
        with _framework_logs("report", verbose):
            return run_report(settings)
    with _framework_logs("report", verbose), _ray(ray_address):
        return run_report(settings, ray.cluster_resources(), progress)


@contextmanager
def _callbacks(shown) -> Iterator[list]:
    with shown as callback:
        yield [callback]


@app.command("serve")
def serve_command(
    model_uri: Annotated[
        str, typer.Option(help="MLflow model URI (models:/name@alias, runs:/...) or checkpoint.")
    ] = "models:/memlab-champion@champion",
    tracking_uri: Annotated[
        str | None, typer.Option(help="MLflow; default MLFLOW_TRACKING_URI, else memlab_runs/.")
    ] = None,
    host: Annotated[str, typer.Option(help="Listen address (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_replicas: Annotated[int, typer.Option(min=1, help="Autoscaling upper bound.")] = 2,
    name: Annotated[str, typer.Option(help="Serve application name.")] = "memlab",
    ray_address: RayAddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """Serve a registered model over HTTP with Ray Serve (sessions, batching) until Ctrl-C.

    The API key, if any, is read from MEMLAB_API_KEY (never from the command line).
    """
    from pydantic import ValidationError

    from serve.args import ServeArgs
    from serve.local import LOOPBACK, serve_until_interrupted

    try:
        deployment = {"max_replicas": max_replicas}
        args = ServeArgs(model_uri=model_uri, tracking_uri=tracking_uri, deployment=deployment)
    except ValidationError as error:
        raise typer.BadParameter(str(error)) from error
    keyed = args.resolved().requires_api_key
    if host != LOOPBACK and not keyed:
        raise typer.BadParameter(
            f"--host {host} opens the server beyond loopback: set MEMLAB_API_KEY first (clients "
            "then send it as X-API-Key), or keep the default 127.0.0.1",
            param_hint="--host",
        )
    deploying = console.status("deploying with Ray Serve (the model loads in each replica)...")

    def ready(url: str) -> None:
        deploying.stop()
        key = "required (X-API-Key header)" if keyed else "not required (set MEMLAB_API_KEY)"
        console.print(f"[bold green]serving[/bold green] {model_uri} at {url}")
        console.print(f"API docs: {url}/docs\nAPI key: {key}\nCtrl-C stops the server.")

    with _framework_logs("serve", verbose), _ray(ray_address):
        deploying.start()
        try:
            serve_until_interrupted(args, host=host, port=port, name=name, on_ready=ready)
        except RuntimeError as error:  # the model did not load, the port is taken...
            deploying.stop()
            console.print(f"[bold red]error:[/bold red] {error}")
            raise typer.Exit(1) from None


@app.command()
def recipes() -> None:
    """List the recipes `memlab train --recipe` and `memlab tune --recipe` start from."""
    from pipelines.recipes import CLAIMS, RECIPES

    for recipe_name, make in sorted(RECIPES.items()):
        config = make()
        claim = CLAIMS.get(recipe_name)
        console.print(
            f"{recipe_name:24} {config.model.memory.kind:15} task={config.data.task.kind} "
            f"epochs={config.train.epochs} workers={config.scaling.num_workers}"
            + (f"  learns: {claim}" if claim else ""),
            highlight=False,
        )


@app.command()
def run(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides of the mqar-demo recipe: train.epochs=1"),
    ] = None,
    kinds: KindsOption = None,
    memory_sizes: MemorySizesOption = None,
    thresholds: ThresholdsOption = None,
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe", "-r", help="The task: mqar-demo (recall), or text-small (a text model)."
        ),
    ] = "mqar-demo",
    name: Annotated[str, typer.Option(help="Sweep name; the same name resumes it.")] = "main",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Loopback port to serve on.")] = 8000,
    ray_address: RayAddressOption = None,
    verbose: VerboseOption = False,
) -> None:
    """The main job on the embedded default: prep -> sweep -> champion -> serve -> a session."""
    from pipelines.data import DataError
    from pipelines.experiment import OverrideError
    from pipelines.main_job import MainJobSettings, main_config, run_main_job
    from pipelines.runtime import RayConnectError
    from pipelines.tune.space import SpaceError

    defaults = MainJobSettings()
    settings = MainJobSettings(
        recipe=recipe,
        kinds=tuple(kinds or defaults.kinds),
        memory_sizes=tuple(memory_sizes or defaults.memory_sizes),
        thresholds=tuple(thresholds or defaults.thresholds),
        sweep_name=name,
        port=port,
        overrides=tuple(overrides or ()),
        ray_address=ray_address,
    )
    try:
        main_config(settings)  # refuses a bad override or recipe before any file is written
    except (OverrideError, DataError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="OVERRIDES/--recipe/--kind") from error
    try:
        with _framework_logs("run", verbose):
            run_main_job(settings, console)
    except (SpaceError, DataError) as error:
        raise typer.BadParameter(
            str(error), param_hint="OVERRIDES/--kind/--memory-size/--threshold"
        ) from error
    except RayConnectError as error:
        console.print(f"[bold red]error:[/bold red] {error}")
        raise typer.Exit(1) from None


def _config(recipe: str, overrides: list[str] | None, extra: dict | None = None):
    """The recipe with the overrides applied and checked, or a usage error naming the key; and
    refused when its results would vanish with a Ray job's temporary working directory."""
    from pipelines.data import DataError
    from pipelines.experiment import OverrideError, apply_overrides
    from pipelines.recipes import recipe as load_recipe
    from pipelines.runtime import VanishingOutputs, refuse_vanishing_outputs

    try:
        config = apply_overrides(load_recipe(recipe), list(overrides or []))
        config = apply_overrides(config, extra or {})
        config.data.check()
    except (OverrideError, DataError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="OVERRIDES/--recipe") from error
    try:
        refuse_vanishing_outputs(_outputs(config))
    except VanishingOutputs as error:
        console.print(f"[bold red]error:[/bold red] {error}", highlight=False)
        raise typer.Exit(2) from None
    return config


def _outputs(config) -> dict[str, Path]:
    """Where a run writes what must outlive it, by the name a user sets it with."""
    from pipelines.runtime import local_store_file

    outputs = {
        "checkpoints (run.storage_path)": config.run.storage_path,
        "the data cache (data.cache_dir)": config.data.cache_dir,
    }
    store = local_store_file(config.tracking.resolved_uri())
    if store is not None:
        outputs["the MLflow store (MLFLOW_TRACKING_URI)"] = store
    return outputs


def _framework_logs(command: str, verbose: bool):
    from pipelines.terminal import framework_logs_to_file

    return framework_logs_to_file(console, command, verbose)


@contextmanager
def _ray(address: str | None) -> Iterator[None]:
    """Join or start Ray by the `--ray-address` rule for the block; stop a private one after."""
    from pipelines.runtime import RayConnectError, connect

    try:
        runtime = connect(address, say=console.print)
    except RayConnectError as error:
        console.print(f"[bold red]error:[/bold red] {error}")
        raise typer.Exit(1) from None
    try:
        yield
    finally:
        runtime.shutdown()


if __name__ == "__main__":
    app()
