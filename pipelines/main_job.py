"""`memlab run`: the whole product on this machine, end to end, in minutes.

Ray Data prepares a small recall task -> Ray Tune sweeps mechanism x memory size x forget
threshold, one Ray Train job per trial, every trial an MLflow run -> the best model becomes the
registry's `champion` -> Ray Serve deploys it on loopback -> a demonstration session stores
key-value pairs in one request and asks for them in a later one, so the answers can only come from
the memory the server kept -> a summary, then a clean shutdown.

Running it again resumes the same sweep (`--resume` semantics), so finished trials are not redone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rich.console import Console
from rich.table import Table

from pipelines.data import tasks
from pipelines.data.build import build_datasets
from pipelines.data.config import MQARTask, TextTask
from pipelines.display import sweep_progress, sweep_table
from pipelines.experiment import RUNS_DIR, ExperimentConfig, apply_overrides
from pipelines.recipes import recipe
from pipelines.runtime import connect
from pipelines.tune.settings import SweepOutcome, SweepSettings
from pipelines.tune.space import grid_space, planned_trials
from pipelines.tune.sweep import run_sweep

IGNORE = -100


@dataclass(frozen=True)
class MainJobSettings:
    recipe: str = "mqar-demo"  # `text-small`: a byte-level text champion, served as text
    kinds: Sequence[str] = ("attention", "gru")
    memory_sizes: Sequence[int] = (8, 32)
    thresholds: Sequence[float] = (0.0, 0.1)
    sweep_name: str = "main"
    port: int = 8000
    demo_seed: int = 7
    served_rows: int = 32  # fresh rows scored through the server after the demonstration
    append_tokens: int = 8  # tokens per session request when scoring them
    overrides: Sequence[str] = ()  # dotted, into the `mqar-demo` recipe (train.epochs=1)
    ray_address: str | None = None


def main_config(settings: MainJobSettings) -> ExperimentConfig:
    """The sweep's base config; a bad override fails here, before anything is written."""
    start = apply_overrides(recipe(settings.recipe), {"model.memory.kind": settings.kinds[0]})
    base = apply_overrides(start, list(settings.overrides))
    base.data.check()
    return base


def run_main_job(settings: MainJobSettings, console: Console) -> None:
    base = main_config(settings).with_absolute_paths()
    runtime = connect(settings.ray_address, say=console.print)
    try:
        _prepare(base, console)
        outcome = _sweep(base, settings, console)
        if not outcome.champion:
            console.print("[bold red]no trial produced a model; nothing to serve[/bold red]")
            return
        _serve_and_demonstrate(base, outcome, settings, console)
        _summary(base, outcome, console)
    finally:
        runtime.shutdown()


def _prepare(base: ExperimentConfig, console: Console) -> None:
    console.rule("[bold]1/4 data[/bold]  Ray Data -> cached Parquet")
    with console.status("preparing data...") as status:
        prepared = build_datasets(base.data, progress=status.update)
    meta = prepared.metadata
    state = "reused from cache" if prepared.cached else "written"
    console.print(
        f"{base.data.task.kind} {meta.train_rows:,} train / {meta.test_rows:,} test rows of "
        f"{meta.train_seq_len} tokens, vocabulary {meta.vocab_size} ({state}: {prepared.path})"
    )


def _sweep(base: ExperimentConfig, settings: MainJobSettings, console: Console) -> SweepOutcome:
    space = grid_space(settings.kinds, settings.memory_sizes, settings.thresholds)
    trials = planned_trials(space)
    console.rule(
        f"[bold]2/4 sweep[/bold]  Ray Tune: {trials} trials, each a Ray Train job and an MLflow run"
    )
    # FIFO, not ASHA: with two epochs per trial early stopping saves little, and a trial ASHA
    # stops leaks its Train placement group when another Ray instance runs on this machine.
    sweep = SweepSettings(
        name=settings.sweep_name, storage_path=RUNS_DIR / "tune", scheduler="fifo"
    )
    with sweep_progress(console, sweep.name, trials, sweep.metric, sweep.mode) as shown:
        outcome = run_sweep(base, space, sweep, resume=True, callbacks=[shown])
    console.print(sweep_table(outcome))
    return outcome


def _serve_and_demonstrate(
    base: ExperimentConfig, outcome: SweepOutcome, settings: MainJobSettings, console: Console
) -> None:
    from serve.args import ServeArgs
    from serve.client import MemlabClient
    from serve.local import start_local, stop_local

    champion = outcome.champion
    console.rule(
        f"[bold]3/4 serve[/bold]  Ray Serve: {champion['uri']} "
        f"({champion['mechanism']}, memory_size={champion['memory_size']})"
    )
    args = ServeArgs(model_uri=champion["uri"], tracking_uri=base.tracking.resolved_uri())
    with console.status("deploying the champion..."):
        url = start_local(args, port=settings.port)
    console.print(f"serving at {url} (API docs at {url}/docs)")
    try:
        with MemlabClient(url) as client:
            console.rule("[bold]4/4 a session[/bold]  memory kept on the server between requests")
            if isinstance(base.data.task, TextTask):
                _demonstrate_text(client, url, champion["registered_model"], console)
            elif isinstance(base.data.task, MQARTask):
                _demonstrate(client, base.data.task, settings.demo_seed, console)
                _served_accuracy(client, base.data.task, champion, settings, console)
    finally:
        stop_local()
        from ray import serve

        serve.shutdown()


def _demonstrate(client, task: MQARTask, seed: int, console: Console) -> None:
    example = tasks.generate(task.test_task(), 1, seed)
    inputs = [int(t) for t in example["inputs"][0]]
    labels = [int(t) for t in example["labels"][0]]
    pairs = int(example["num_kv_pairs"][0])
    context, queries = inputs[: 2 * pairs], inputs[2 * pairs :]

    session = client.create_session()
    client.append(session.session_id, tokens=context)
    info = client.inspect(session.session_id)
    shown = ", ".join(f"{k}->{v}" for k, v in zip(context[::2], context[1::2], strict=True))
    console.print(
        f"request 1 stores {pairs} key->value pairs: {shown}\n"
        f"  the session now holds {info.tokens_seen} tokens in {info.state_bytes:,} bytes of state"
    )
    answers = client.append(session.session_id, tokens=queries).answers
    remembered = _recall_rows(queries, answers, labels[2 * pairs :])
    client.delete(session.session_id)

    fresh = client.create_session()
    forgotten = client.append(fresh.session_id, tokens=queries).answers
    client.delete(fresh.session_id)
    console.print(_recall_table(remembered, forgotten))


def _served_accuracy(
    client, task: MQARTask, champion: dict, settings: MainJobSettings, console: Console
) -> None:
    """The champion's accuracy as a client meets it, beside the accuracy that chose it: fresh
    rows of its task read whole (`/v1/predict`) and through sessions appending a few tokens per
    request. Every memory is chunk invariant, so the two agree; this shows it."""
    batch = tasks.generate(task.test_task(), settings.served_rows, settings.demo_seed + 1)
    rows, labels = batch["inputs"].tolist(), batch["labels"].tolist()
    with console.status(f"scoring {len(rows)} fresh rows through the server..."):
        whole = client.predict(rows, top_k=1, positions=[list(range(len(r))) for r in rows])
        predicted = [[p.answer for p in result.predictions] for result in whole.results]
        appended = [_session_answers(client, row, settings.append_tokens) for row in rows]
    console.print(
        f"accuracy: registered {champion['val_accuracy']:.3f} (validation); served on "
        f"{len(rows)} fresh rows: whole rows (/v1/predict) {_accuracy(predicted, labels):.3f}, "
        f"sessions appending {settings.append_tokens} tokens a request "
        f"{_accuracy(appended, labels):.3f}",
        soft_wrap=True,
    )


def _session_answers(client, row: list[int], append_tokens: int) -> list[int]:
    """The answers a session gives for `row` read `append_tokens` tokens per request."""
    session = client.create_session().session_id
    answers: list[int] = []
    for start in range(0, len(row), append_tokens):
        answers += client.append(session, tokens=row[start : start + append_tokens]).answers
    client.delete(session)
    return answers


def _accuracy(answers: list[list[int]], labels: list[list[int]]) -> float:
    """Share of the scored positions (labels other than IGNORE) answered right."""
    pairs = [
        (answer, label)
        for row_answers, row_labels in zip(answers, labels, strict=True)
        for answer, label in zip(row_answers, row_labels, strict=True)
        if label != IGNORE
    ]
    return float(np.mean([answer == label for answer, label in pairs]))


def _demonstrate_text(client, url: str, model_name: str, console: Console) -> None:
    """A text champion: one session continues a prompt, then the OpenAI-compatible call."""
    session = client.create_session().session_id
    prompt = "def main():\n    "
    client.append(session, text=prompt)
    reply = client.generate(session, max_new_tokens=64, temperature=0.7, top_k=20, seed=0)
    console.print(f"request 1 appends {prompt!r}; request 2 continues it from the session:")
    console.print(prompt + (reply.text or ""), markup=False, highlight=False)
    client.delete(session)
    console.print(
        "any OpenAI client works too (stream=True included):\n"
        f'  OpenAI(base_url="{url}/v1", api_key="...").completions.create('
        f'model="{model_name}", prompt="def ", max_tokens=64)',
        markup=False,
        highlight=False,
    )


def _recall_rows(queries: list[int], answers: list[int], labels: list[int]) -> list[tuple]:
    """(position, key, stored value, answer) at every position the task scores."""
    return [
        (i, queries[i], labels[i], answers[i]) for i in range(len(queries)) if labels[i] != IGNORE
    ]


def _recall_table(remembered: list[tuple], forgotten: list[int]) -> Table:
    table = Table(title="request 2 asks for the keys again (a later request, same session)")
    for column in ("key", "stored value", "answer", "", "a fresh session answers"):
        table.add_column(column, justify="right")
    for position, key, value, answer in remembered:
        mark = "[green]yes[/green]" if answer == value else "[red]no[/red]"
        table.add_row(str(key), str(value), str(answer), mark, str(forgotten[position]))
    right = np.mean([answer == value for _, _, value, answer in remembered])
    fresh = np.mean([forgotten[p] == value for p, _, value, _ in remembered])
    table.caption = (
        f"recalled {right:.0%} from the session's memory; {fresh:.0%} without it (a new session)"
    )
    return table


def _summary(base: ExperimentConfig, outcome: SweepOutcome, console: Console) -> None:
    console.rule("[bold]done[/bold]")
    champion = outcome.champion
    console.print(
        f"champion: {champion['uri']} = version {outcome.champion_version} "
        f"({champion['mechanism']}, memory_size={champion['memory_size']}, "
        f"forget_threshold={champion['forget_threshold']}, "
        f"val_accuracy={champion['val_accuracy']:.3f})"
    )
    console.print(f"results table: {outcome.table_path}")
    for path in outcome.plot_paths:
        console.print(f"plot: {path}")
    console.print(
        "MLflow UI: mlflow ui --host 127.0.0.1 --backend-store-uri "
        f"{base.tracking.resolved_uri()}   then open http://127.0.0.1:5000"
    )
    console.print("serve it again: memlab serve   (the champion from the registry)")
