"""`memlab submit` and `memlab jobs`: the command surface over the Ray Jobs API (`submit.py`).

The token is read from RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token, never taken as an
option, and never printed.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from pipelines import submit as jobs

console = Console()

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
) -> jobs.JobSpec:
    from pydantic import ValidationError

    pairs = [item.split("=", 1) for item in env or []]
    if any(len(pair) != 2 or not pair[0] for pair in pairs):
        raise typer.BadParameter("give KEY=VALUE", param_hint="--env")
    try:
        return jobs.JobSpec(
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
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return f"{jobs.redact(uri)} (MLFLOW_TRACKING_URI of this shell)"
    return "the cluster's MLFLOW_TRACKING_URI, else memlab's default store"


def _follow_to_the_end(client, job_id: str) -> None:
    try:
        details = jobs.follow(client, job_id, _write_raw)
    except KeyboardInterrupt:
        console.print(f"\nstopped following; the job goes on (memlab jobs stop {job_id})")
        raise typer.Exit(130) from None
    except jobs.SubmitError as error:
        _job_error(error)
    _report_end(details)


def _report_end(details) -> None:
    """After a followed log: its last lines are on screen already, so the verdict alone."""
    if jobs.is_success(details):
        console.print(f"[bold green]done[/bold green] {jobs.summary(details)}", highlight=False)
        return
    console.print("[bold red]job did not succeed:[/bold red]", end=" ")
    console.print(jobs.verdict(details), markup=False, highlight=False)
    raise typer.Exit(1)


def _write_raw(text: str) -> None:
    # Job logs carry their own colours and brackets: no rich markup on them.
    sys.stdout.write(text)
    sys.stdout.flush()


def _job_error(error: Exception) -> NoReturn:
    console.print(f"[bold red]error:[/bold red] {escape(str(error))}", highlight=False)
    raise typer.Exit(1) from None


def _print_plain(text: str) -> None:
    console.print(text, markup=False, highlight=False)


@jobs_app.command("list")
def jobs_list(address: AddressOption = None) -> None:
    """Every job the cluster knows, oldest first: id, status, exit, duration, command."""
    _, client, _ = _jobs_client(address)
    try:
        found = jobs.list_jobs(client)
    except jobs.SubmitError as error:
        _job_error(error)
    for details in found:
        _print_plain(jobs.summary(details))
    if not found:
        console.print("no jobs on this cluster")


@jobs_app.command("status")
def jobs_status(
    job_id: Annotated[str, typer.Argument(help="Submission id.")], address: AddressOption = None
) -> None:
    """One job's status line; for a job that failed or was stopped, why, and its log's tail."""
    _, client, _ = _jobs_client(address)
    try:
        details = jobs.job_details(client, job_id)
        if jobs.is_success(details) or not details.status.is_terminal():
            _print_plain(jobs.summary(details))
            return
        _print_plain(jobs.failure_report(details, jobs.job_logs(client, job_id)))
    except jobs.SubmitError as error:
        _job_error(error)


@jobs_app.command("logs")
def jobs_logs(
    job_id: Annotated[str, typer.Argument(help="Submission id.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")
    ] = False,
    address: AddressOption = None,
) -> None:
    """A job's log so far; with --follow, streamed until the job ends."""
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
    _, client, _ = _jobs_client(address)
    try:
        details = jobs.stop(client, job_id, timeout)
    except jobs.SubmitError as error:
        _job_error(error)
    _print_plain(jobs.summary(details))
