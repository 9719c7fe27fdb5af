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

# The sweep grid, shared by `memlab tune` and `memlab run`.
KindsOption = Annotated[
    list[str] | None, typer.Option("--kind", "-k", help="Mechanism to sweep (repeatable).")
]
MemorySizesOption = Annotated[
    list[int] | None, typer.Option("--memory-size", "-m", help="Grid value (repeatable).")
]
ThresholdsOption = Annotated[
    list[float] | None, typer.Option("--threshold", "-t", help="Grid value (repeatable).")
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
    kinds: KindsOption = None,
    memory_sizes: MemorySizesOption = None,
    thresholds: ThresholdsOption = None,
    space: Annotated[
        str | None,
        typer.Option(help='More dimensions as JSON: {"train.lr": {"loguniform": [1e-4, 1e-2]}}'),
    ] = None,
    name: Annotated[str, typer.Option(help="Sweep name (also its MLflow parent run).")] = "sweep",
    scheduler: Annotated[str, typer.Option(help="asha or fifo.")] = "asha",
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
            name=name,
            scheduler=scheduler,
            search=search,
            num_samples=num_samples,
            max_concurrent_trials=max_concurrent_trials,
        )
        from pipelines.train.session import local_ray

        local_ray(ray_address)
        with console.status(f"sweep {name}: trials running (Ray Tune)..."):
            outcome = run_sweep(base, raw_space, settings, resume=resume)
    except (OverrideError, SpaceError, ValueError) as error:
        raise typer.BadParameter(str(error), param_hint="--space/--kind/OVERRIDES") from error
    _print_sweep(outcome)


def _print_sweep(outcome) -> None:
    from pipelines.display import sweep_table

    console.print(sweep_table(outcome))
    console.print(f"results: {outcome.table_path}")
    for path in outcome.plot_paths:
        console.print(f"plot: {path}")
    if outcome.champion:
        console.print(
            f"[bold green]champion[/bold green] {outcome.champion['uri']} "
            f"(version {outcome.champion_version}, {outcome.champion['mechanism']})"
        )


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
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address; default: a local Ray.")
    ] = None,
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

    def ready(url: str) -> None:
        key = "required (X-API-Key header)" if keyed else "not required (set MEMLAB_API_KEY)"
        console.print(f"[bold green]serving[/bold green] {model_uri} at {url}")
        console.print(f"API docs: {url}/docs\nAPI key: {key}\nCtrl-C stops the server.")
        if host != LOOPBACK and not keyed:
            console.print("[bold red]warning:[/bold red] listening beyond loopback without a key")

    try:
        serve_until_interrupted(
            args, host=host, port=port, name=name, ray_address=ray_address, on_ready=ready
        )
    except RuntimeError as error:  # the model did not load, the port is taken...
        console.print(f"[bold red]error:[/bold red] {error}")
        raise typer.Exit(1) from None


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


# `memlab submit` and `memlab jobs`: the Ray Jobs API (pipelines/submit.py). The token is read
# from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token, never taken as an option.
AddressOption = Annotated[
    str | None,
    typer.Option(
        "--address",
        "-a",
        envvar="RAY_API_SERVER_ADDRESS",
        help="The cluster's Jobs API (its dashboard); default http://127.0.0.1:8265.",
        show_default=False,
    ),
]
jobs_app = typer.Typer(
    help="Ray jobs on a cluster: list, status, logs, stop.", no_args_is_help=True
)
app.add_typer(jobs_app, name="jobs")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(
    command: Annotated[str, typer.Argument(help="train, tune or prep.")],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="The command's own options and overrides (after `--`)."),
    ] = None,
    address: AddressOption = None,
    env: Annotated[
        list[str] | None,
        typer.Option("--env", "-e", help="KEY=VALUE for the job (repeatable); no credentials."),
    ] = None,
    where: Annotated[
        str, typer.Option(help="local (this machine), remote, or auto: ask the cluster.")
    ] = "auto",
    pip: Annotated[
        bool, typer.Option("--pip", help="Install the project's dependencies in the job (remote).")
    ] = False,
    run_dir: Annotated[
        str | None,
        typer.Option(help="Folder the command runs in; on several nodes a mount they share."),
    ] = None,
    submission_id: Annotated[str | None, typer.Option(help="Job id; default: Ray's.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait/--no-wait", help="Follow the log until the job ends.")
    ] = True,
) -> None:
    """Run a memlab command as a Ray job on a cluster and follow its log.

    memlab submit --address http://127.0.0.1:8265 -- train --recipe debug-gru train.epochs=2
    """
    from pipelines import submit as jobs

    spec = _job_spec(command, args, env, where, pip, run_dir, submission_id)
    cluster, client, token = _jobs_client(address)
    try:
        local = spec.placement == "local" or (
            spec.placement == "auto" and jobs.on_this_machine(cluster, token)
        )
        job_id = jobs.submit(client, spec, local)
    except jobs.SubmitError as error:
        _job_error(error)
    where_shown = "this machine, this interpreter" if local else "remote, project uploaded"
    console.print(f"submitted [bold]{job_id}[/bold] to {cluster.address} ({where_shown})")
    console.print(f"tracking: {_tracking_shown()}", markup=False, highlight=False)
    if not wait:
        console.print(f"follow it with: memlab jobs logs {job_id} --follow", markup=False)
        return
    _follow_to_the_end(client, job_id)


def _job_spec(
    command: str,
    args: list[str] | None,
    env: list[str] | None,
    where: str,
    pip: bool,
    run_dir: str | None,
    submission_id: str | None,
):
    from pydantic import ValidationError

    from pipelines.submit import JobSpec

    pairs = [item.split("=", 1) for item in env or []]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise typer.BadParameter("give KEY=VALUE", param_hint="--env")
    try:
        return JobSpec(
            command=command,
            args=tuple(args or ()),
            env=dict(pairs),
            placement=where,
            pip=pip,
            run_dir=run_dir,
            submission_id=submission_id,
        )
    except ValidationError as error:
        message = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise typer.BadParameter(message, param_hint="COMMAND/--env/--where") from None


def _jobs_client(address: str | None):
    """(cluster settings, client, token) for the Jobs API at `address`, or a clear exit."""
    from pydantic import ValidationError

    from pipelines import submit as jobs

    try:
        cluster = jobs.ClusterSettings(address=address) if address else jobs.ClusterSettings()
    except ValidationError as error:
        raise typer.BadParameter(error.errors()[0]["msg"], param_hint="--address") from None
    try:
        token = jobs.find_token()
        return cluster, jobs.connect(cluster, token), token
    except jobs.SubmitError as error:
        _job_error(error)


def _tracking_shown() -> str:
    import os

    from pipelines.submit import redact

    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return f"{redact(uri)} (MLFLOW_TRACKING_URI of this shell)"
    return "the cluster's MLFLOW_TRACKING_URI, else memlab's default store"


def _follow_to_the_end(client, job_id: str) -> None:
    from pipelines import submit as jobs

    try:
        details = jobs.follow(client, job_id, _write_raw)
    except KeyboardInterrupt:
        console.print(f"\nstopped following; the job goes on (memlab jobs stop {job_id})")
        raise typer.Exit(130) from None
    except jobs.SubmitError as error:
        _job_error(error)
    _report_end(client, details)


def _report_end(client, details) -> None:
    """After a followed log: its last lines are on screen already, so the verdict alone."""
    from pipelines import submit as jobs

    if jobs.is_success(details):
        console.print(f"[bold green]done[/bold green] {jobs.summary(details)}", highlight=False)
        return
    console.print("[bold red]job did not succeed:[/bold red]", end=" ")
    console.print(jobs.verdict(details), markup=False, highlight=False)
    raise typer.Exit(1)


def _write_raw(text: str) -> None:
    # Job logs carry their own colours and brackets: no rich markup on them.
    import sys

    sys.stdout.write(text)
    sys.stdout.flush()


def _job_error(error: Exception):
    from rich.markup import escape

    console.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False)
    raise typer.Exit(1) from None


@jobs_app.command("list")
def jobs_list(address: AddressOption = None) -> None:
    """Every job the cluster knows, oldest first: id, status, exit, duration, command."""
    from pipelines import submit as jobs

    _, client, _ = _jobs_client(address)
    try:
        found = jobs.list_jobs(client)
    except jobs.SubmitError as error:
        _job_error(error)
    for details in found:
        console.print(jobs.summary(details), markup=False, highlight=False)
    if not found:
        console.print("no jobs on this cluster")


@jobs_app.command("status")
def jobs_status(
    job_id: Annotated[str, typer.Argument(help="Submission id.")], address: AddressOption = None
) -> None:
    """One job's status line; for a job that failed or was stopped, why, and its log's tail."""
    from pipelines import submit as jobs

    _, client, _ = _jobs_client(address)
    try:
        details = jobs.job_details(client, job_id)
    except jobs.SubmitError as error:
        _job_error(error)
    if jobs.is_success(details) or not details.status.is_terminal():
        console.print(jobs.summary(details), markup=False, highlight=False)
        return
    report = jobs.failure_report(details, jobs.job_logs(client, job_id))
    console.print(report, markup=False, highlight=False)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="Submission id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
    address: AddressOption = None,
) -> None:
    """A job's log so far; with --follow, streamed until the job ends."""
    from pipelines import submit as jobs

    _, client, _ = _jobs_client(address)
    if follow:
        _follow_to_the_end(client, job_id)
        return
    try:
        _write_raw(jobs.job_logs(client, job_id))
    except jobs.SubmitError as error:
        _job_error(error)


@jobs_app.command("stop")
def jobs_stop(
    job_id: Annotated[str, typer.Argument(help="Submission id.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for it to end.")] = 30.0,
    address: AddressOption = None,
) -> None:
    """Stop a job (SIGTERM, then SIGKILL after Ray's grace period) and wait until it has ended."""
    from pipelines import submit as jobs

    _, client, _ = _jobs_client(address)
    try:
        details = jobs.stop(client, job_id, timeout)
    except jobs.SubmitError as error:
        _job_error(error)
    console.print(jobs.summary(details), markup=False, highlight=False)


@app.command()
def run(
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides of the mqar-demo recipe: train.epochs=1"),
    ] = None,
    kinds: KindsOption = None,
    memory_sizes: MemorySizesOption = None,
    thresholds: ThresholdsOption = None,
    name: Annotated[str, typer.Option(help="Sweep name; the same name resumes it.")] = "main",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Loopback port to serve on.")] = 8000,
) -> None:
    """The main job on the embedded default: prep -> sweep -> champion -> serve -> a session."""
    from pipelines.data import DataError
    from pipelines.experiment import OverrideError
    from pipelines.main_job import MainJobSettings, run_main_job
    from pipelines.tune.space import SpaceError

    defaults = MainJobSettings()
    settings = MainJobSettings(
        kinds=tuple(kinds or defaults.kinds),
        memory_sizes=tuple(memory_sizes or defaults.memory_sizes),
        thresholds=tuple(thresholds or defaults.thresholds),
        sweep_name=name,
        port=port,
        overrides=tuple(overrides or ()),
    )
    try:
        run_main_job(settings, console)
    except (OverrideError, SpaceError, DataError) as error:
        raise typer.BadParameter(
            str(error), param_hint="OVERRIDES/--kind/--memory-size/--threshold"
        ) from error


if __name__ == "__main__":
    app()
