"""Serving under load: latency and throughput of the local Ray Serve deployment, over loopback.

Measurements against fresh local deployments of one untrained model published to a temporary
MLflow store (`pipelines.train.publish`), so nothing depends on an earlier sweep:

* load: stateless `/v1/predict` requests of `--predict-len` tokens from `c` concurrent clients
  (c in `--concurrency`), `--requests` per level: p50/p99 latency, requests/s and tokens/s,
  with dynamic batching on and off (`@serve.batch` against one forward per request);
* overhead: p50 and p99 at one client minus the same forward called in this process;
* sessions: append `--chunk` tokens at a time to one session until it has read `--history`
  tokens, against a stateless client that re-sends the whole history to `/v1/predict` each time.
  A bounded memory keeps the session's latency flat; the re-sender's grows;
* affinity: `--sessions` clients appending to their own sessions on two model replicas, with
  session affinity (a session's requests go to the replica holding its hot copy) on and off;
* OpenAI streaming: time to first token and tokens/s of `/v1/completions` with `stream: true`.

Client, proxy and replica share this machine's cores, so absolute numbers are pessimistic; the
comparisons (batching on/off, session/re-send, served/in-process) are the point.

Run from the repository root: `.venv/bin/python benchmarks/bench_serve.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

import httpx
import torch
from bench_common import (
    RESULTS_DIR,
    format_table,
    from_args,
    log,
    machine_info,
    median_seconds,
    parse_with_quick,
    write_json,
)

from memory_models.model import SequenceModel
from pipelines.experiment import apply_overrides
from pipelines.recipes import SMALL_RECALL, debug

QUICK = {"concurrency": [1, 8], "requests": 40, "history": 256, "sessions": 4, "appends": 10}
NOTE = (
    "Latencies are client-side wall times over loopback (HTTP + Serve proxy + replica). "
    "batching off = one forward pass per request; on = @serve.batch, up to {batch} sequences "
    "per pass, {wait_ms:g} ms wait. One replica, 1 torch thread. Session: append {chunk} tokens "
    "per request; re-send: /v1/predict on the whole history so far. In-process: the same "
    "forward on the model in this process."
)
APP = "memlab-bench"

VOCAB = SMALL_RECALL.vocab_size  # the debug recipes' vocabulary: request tokens stay in it


@dataclasses.dataclass(frozen=True)
class Sizes:
    kind: str
    d_model: int
    window: int
    predict_len: int
    chunk: int
    history: int
    concurrency: list[int]
    requests: int
    max_batch_size: int
    batch_wait_ms: float
    sessions: int
    appends: int
    stream_tokens: int


@dataclasses.dataclass(frozen=True)
class LoadRow:
    batching: str
    concurrency: int
    requests: int
    refused: int
    p50_ms: float
    p99_ms: float
    requests_per_s: float
    tokens_per_s: float


@dataclasses.dataclass(frozen=True)
class HistoryRow:
    """Medians over the appends that brought the session's history into (low, high] tokens."""

    low: int
    high: int
    appends: int
    session_append_ms: float
    resend_history_ms: float
    in_process_append_ms: float


@dataclasses.dataclass(frozen=True)
class AffinityRow:
    affinity: str
    sessions: int
    appends: int
    p50_ms: float
    p99_ms: float
    appends_per_s: float


@dataclasses.dataclass(frozen=True)
class StreamRow:
    requests: int
    tokens: int
    first_token_ms: float
    tokens_per_s: float

    def summary(self) -> str:
        return f"first token {self.first_token_ms:.1f} ms, {self.tokens_per_s:.0f} tokens/s"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def load_level(url: str, sizes: Sizes, concurrency: int) -> tuple[list[float], int, float]:
    """`sizes.requests` predicts from `concurrency` clients: latencies, refusals, wall time."""
    body = {"sequences": [[(7 * i) % VOCAB for i in range(sizes.predict_len)]], "top_k": 5}
    todo = iter(range(sizes.requests))
    latencies: list[float] = []
    refused = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal refused
        for _ in todo:
            started = time.perf_counter()
            answer = await client.post("/v1/predict", json=body)
            if answer.status_code == 503:
                refused += 1
                continue
            answer.raise_for_status()
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await client.post("/v1/predict", json=body)  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return latencies, refused, wall


def measure_load(urls: dict[str, str], sizes: Sizes, log: Callable[[str], None]) -> list[LoadRow]:
    """Each concurrency level against each deployment in turn, so both see the same machine."""
    rows = []
    for concurrency in sizes.concurrency:
        for batching, url in urls.items():
            rows.append(_load_row(url, sizes, batching, concurrency))
            row = rows[-1]
            log(
                f"  batching {batching:3} c={concurrency:<3} p50 {row.p50_ms:7.1f} ms  "
                f"p99 {row.p99_ms:7.1f} ms  {row.requests_per_s:7.1f} req/s  "
                f"refused {row.refused}"
            )
    return sorted(rows, key=lambda row: (row.batching, row.concurrency))


def _load_row(url: str, sizes: Sizes, batching: str, concurrency: int) -> LoadRow:
    latencies, refused, wall = asyncio.run(load_level(url, sizes, concurrency))
    done = len(latencies)
    return LoadRow(
        batching=batching,
        concurrency=concurrency,
        requests=done,
        refused=refused,
        p50_ms=1000 * percentile(latencies, 0.5),
        p99_ms=1000 * percentile(latencies, 0.99),
        requests_per_s=done / wall,
        tokens_per_s=done * sizes.predict_len / wall,
    )


def measure_history(
    url: str, model: SequenceModel, sizes: Sizes, log: Callable[[str], None]
) -> list[HistoryRow]:
    """Append chunk after chunk to one session; after each, re-send the whole history to the
    stateless endpoint, and run the same append on the model in this process."""
    tokens = [(11 * i + 3) % VOCAB for i in range(sizes.history)]
    timings: list[tuple[int, float, float, float]] = []  # (history, append, re-send, local)
    state = None
    with httpx.Client(base_url=url, timeout=120) as client:
        session = _ok(client.post("/v1/sessions")).json()["session_id"]
        for end in range(sizes.chunk, sizes.history + 1, sizes.chunk):
            append, resend, local, state = _step(
                client, session, model, tokens[:end], sizes.chunk, state
            )
            timings.append((end, append, resend, local))
    rows = [_bucket(timings, low, high) for low, high in _buckets(sizes)]
    for row in rows:
        log(
            f"  history ({row.low:4}, {row.high:4}]: session append {row.session_append_ms:6.1f} "
            f"ms, re-send {row.resend_history_ms:6.1f} ms, "
            f"in-process {row.in_process_append_ms:5.2f} ms"
        )
    return rows


def _step(client: httpx.Client, session: str, model: SequenceModel, history, chunk_len, state):
    """One append three ways; seconds for each, and the in-process state after it."""
    chunk = history[-chunk_len:]
    started = time.perf_counter()
    _ok(client.post(f"/v1/sessions/{session}/append", json={"tokens": chunk}))
    appended = time.perf_counter()
    _ok(client.post("/v1/predict", json={"sequences": [history]}))
    resent = time.perf_counter()
    state = _in_process_append(model, chunk, state)
    local = time.perf_counter()
    return appended - started, resent - appended, local - resent, state


def _buckets(sizes: Sizes) -> list[tuple[int, int]]:
    """(0, chunk], then doubling ranges up to the history length."""
    bounds, high = [0], sizes.chunk
    while high < sizes.history:
        bounds.append(high)
        high *= 2
    bounds.append(sizes.history)
    return list(itertools.pairwise(bounds))


def _bucket(timings: list[tuple[int, float, float, float]], low: int, high: int) -> HistoryRow:
    inside = [t for t in timings if low < t[0] <= high]
    return HistoryRow(
        low=low,
        high=high,
        appends=len(inside),
        session_append_ms=1000 * statistics.median(t[1] for t in inside),
        resend_history_ms=1000 * statistics.median(t[2] for t in inside),
        in_process_append_ms=1000 * statistics.median(t[3] for t in inside),
    )


async def affinity_level(url: str, sizes: Sizes) -> tuple[list[float], float]:
    """`sizes.sessions` clients, each appending `sizes.appends` chunks to its own session."""
    chunk = {"tokens": [5] * sizes.chunk}
    latencies: list[float] = []

    async def client_loop(client: httpx.AsyncClient) -> None:
        session = (await client.post("/v1/sessions")).json()["session_id"]
        await client.post(f"/v1/sessions/{session}/append", json=chunk)  # warm: the copy loads
        for _ in range(sizes.appends):
            started = time.perf_counter()
            _ok(await client.post(f"/v1/sessions/{session}/append", json=chunk))
            latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=sizes.sessions)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(sizes.sessions)))
        wall = time.perf_counter() - started
    return latencies, wall


def measure_affinity(url: str, label: str, sizes: Sizes) -> AffinityRow:
    latencies, wall = asyncio.run(affinity_level(url, sizes))
    return AffinityRow(
        affinity=label,
        sessions=sizes.sessions,
        appends=len(latencies),
        p50_ms=1000 * percentile(latencies, 0.5),
        p99_ms=1000 * percentile(latencies, 0.99),
        appends_per_s=len(latencies) / wall,
    )


def measure_stream(url: str, sizes: Sizes, requests: int = 8) -> StreamRow:
    """Streamed completions: time to the first text event, and tokens/s after it."""
    body = {
        "model": "memlab-bench",
        "prompt": "def ",
        "max_tokens": sizes.stream_tokens,
        "temperature": 0,
        "stream": True,
    }
    firsts, rates = [], []
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(requests):
            started = time.perf_counter()
            first = None
            with client.stream("POST", "/v1/completions", json=body) as answer:
                answer.raise_for_status()
                for line in answer.iter_lines():
                    if line.startswith("data: {") and first is None:
                        first = time.perf_counter()
            ended = time.perf_counter()
            firsts.append(first - started)
            rates.append(sizes.stream_tokens / max(ended - first, 1e-9))
    return StreamRow(
        requests=requests,
        tokens=sizes.stream_tokens,
        first_token_ms=1000 * statistics.median(firsts),
        tokens_per_s=statistics.median(rates),
    )


def _ok(answer: httpx.Response) -> httpx.Response:
    answer.raise_for_status()
    return answer


@torch.inference_mode()
def _in_process_append(model: SequenceModel, chunk: list[int], state):
    return model(torch.tensor([chunk]), state)[1]


def in_process_predict_ms(model: SequenceModel, sizes: Sizes) -> float:
    tokens = torch.tensor([[(7 * i) % VOCAB for i in range(sizes.predict_len)]])

    @torch.inference_mode()
    def run() -> None:
        logits, _ = model(tokens)
        logits[0, -1].softmax(-1).topk(5)

    return 1000 * median_seconds(run, warmup=3, repeats=30)


def publish_model(sizes: Sizes, folder: str) -> tuple[str, str]:
    from pipelines.train.publish import publish

    tracking = f"sqlite:///{folder}/mlflow.db"
    config = apply_overrides(
        debug(sizes.kind),
        {
            "tracking.tracking_uri": tracking,
            "run.name": "bench-serve",
            "model.d_model": sizes.d_model,
            "model.memory.memory_size": sizes.window,
        },
    )
    return publish(config, "memlab-bench", steps=0).champion_uri, tracking


def serve_args(
    uri: str, tracking: str, sizes: Sizes, batching: bool, replicas: int = 1, affinity: bool = True
):
    from serve.args import ServeArgs

    return ServeArgs.model_validate(
        {
            "model_uri": uri,
            "tracking_uri": tracking,
            "limits": {
                "max_tokens_per_request": max(4096, sizes.history),
                "max_new_tokens": max(256, sizes.stream_tokens),
            },
            "sessions": {"affinity": affinity},
            "batching": {
                "enabled": batching,
                "max_batch_size": sizes.max_batch_size,
                "wait_timeout_s": sizes.batch_wait_ms / 1000,
            },
            "deployment": {
                "min_replicas": replicas,
                "max_replicas": replicas,
                "max_ongoing_requests": max(64, 2 * max(sizes.concurrency)),
                "max_queued_requests": 1024,
                "replica_cpus": 0.5,
            },
        }
    )


def run_all(sizes: Sizes, port: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Both deployments (batching off and on) side by side, one replica each, then measure."""
    from pipelines.runtime import start_private
    from serve.loading import load_served_model
    from serve.local import start_local, stop_local

    start_private(log_to_driver=False)  # the replicas' logs stay in Ray's session folder
    with tempfile.TemporaryDirectory() as folder:
        uri, tracking = publish_model(sizes, folder)
        model = load_served_model(uri, tracking).model
        # The machine is shared: the model alone is timed before and after, the faster kept.
        in_process_ms = in_process_predict_ms(model, sizes)
        urls = {}
        try:
            for batching, label in ((False, "off"), (True, "on")):
                log(f"deploying with batching {label}...")
                args = serve_args(uri, tracking, sizes, batching)
                name = f"{APP}-{label}"
                urls[label] = start_local(args, port=port, name=name, route_prefix=f"/{label}")
            load_rows = measure_load(urls, sizes, log)
            log("session history (batching on):")
            history_rows = measure_history(urls["on"], model, sizes, log)
            log("OpenAI streaming:")
            stream_row = measure_stream(urls["on"], sizes)
            log(f"  {stream_row.summary()}")
        finally:
            for label in urls:
                stop_local(f"{APP}-{label}")
        affinity_rows = []
        for affinity, label in ((True, "on"), (False, "off")):
            log(f"two replicas, affinity {label}...")
            args = serve_args(uri, tracking, sizes, True, replicas=2, affinity=affinity)
            name = f"{APP}-affinity-{label}"
            url = start_local(args, port=port, name=name, route_prefix=f"/affinity-{label}")
            try:
                affinity_rows.append(measure_affinity(url, label, sizes))
            finally:
                stop_local(name)
            row = affinity_rows[-1]
            log(f"  p50 {row.p50_ms:.1f} ms p99 {row.p99_ms:.1f} ms {row.appends_per_s:.1f}/s")
    return {
        "load": load_rows,
        "history": history_rows,
        "affinity": affinity_rows,
        "stream": stream_row,
        "in_process_predict_ms": min(in_process_ms, in_process_predict_ms(model, sizes)),
    }


def load_table(rows: list[LoadRow], in_process_ms: float) -> str:
    headers = ["batching", "clients", "requests", "503", "p50 ms", "p99 ms", "req/s", "tok/s"]
    headers += ["vs off req/s", "p50 over in-process ms", "p99 over in-process ms"]
    off = {row.concurrency: row.requests_per_s for row in rows if row.batching == "off"}
    cells = [
        [
            row.batching,
            str(row.concurrency),
            str(row.requests),
            str(row.refused),
            f"{row.p50_ms:.1f}",
            f"{row.p99_ms:.1f}",
            f"{row.requests_per_s:.1f}",
            f"{row.tokens_per_s:,.0f}",
            f"{row.requests_per_s / off[row.concurrency]:.2f}x",
            f"{row.p50_ms - in_process_ms:.1f}",
            f"{row.p99_ms - in_process_ms:.1f}",
        ]
        for row in rows
    ]
    return format_table(headers, cells)


def affinity_table(rows: list[AffinityRow]) -> str:
    headers = ["affinity", "sessions", "appends", "p50 ms", "p99 ms", "appends/s"]
    cells = [
        [
            row.affinity,
            str(row.sessions),
            str(row.appends),
            f"{row.p50_ms:.1f}",
            f"{row.p99_ms:.1f}",
            f"{row.appends_per_s:.1f}",
        ]
        for row in rows
    ]
    return format_table(headers, cells)


def history_table(rows: list[HistoryRow]) -> str:
    headers = ["history (tokens)", "appends", "session append ms", "re-send history ms"]
    headers.append("in-process append ms")
    cells = [
        [
            f"{row.low + 1}-{row.high}",
            str(row.appends),
            f"{row.session_append_ms:.1f}",
            f"{row.resend_history_ms:.1f}",
            f"{row.in_process_append_ms:.2f}",
        ]
        for row in rows
    ]
    return format_table(headers, cells)


def markdown(tables: list[tuple[str, str]], note: str) -> str:
    """The plain tables as a markdown file: each one in a fenced block under its title."""
    parts = ["# memlab serving benchmark", ""]
    for title, table in tables:
        parts += [f"## {title}", "", "```", table, "```", ""]
    parts += [note, ""]
    return "\n".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="attention", help="mechanism of the served model")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--window", type=int, default=64, help="memory_size (attention window)")
    parser.add_argument("--predict-len", type=int, default=64, help="tokens per predict request")
    parser.add_argument("--chunk", type=int, default=16, help="tokens per session append")
    parser.add_argument("--history", type=int, default=10240, help="session length reached")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--requests", type=int, default=160, help="predicts per level")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=0.0)
    parser.add_argument("--sessions", type=int, default=8, help="clients in the affinity test")
    parser.add_argument("--appends", type=int, default=40, help="appends per affinity client")
    parser.add_argument("--stream-tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--port", type=int, default=8765, help="Serve's HTTP port (loopback)")
    parser.add_argument("--quick", action="store_true", help="fewer requests, for a smoke run")
    return parse_with_quick(parser, argv, QUICK)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    sizes = from_args(Sizes, args)
    log(f"torch {torch.__version__}; {sizes}")
    started = time.perf_counter()
    results = run_all(sizes, args.port, log)
    note = NOTE.format(batch=sizes.max_batch_size, wait_ms=sizes.batch_wait_ms, chunk=sizes.chunk)
    tables = [
        (
            "Stateless predict under load",
            load_table(results["load"], results["in_process_predict_ms"]),
        ),
        ("Session append as the history grows", history_table(results["history"])),
        (
            "Session appends on two replicas, affinity on and off",
            affinity_table(results["affinity"]),
        ),
    ]
    log("")
    for title, table in tables:
        log(f"{title}\n{table}\n")
    log(f"in-process predict: {results['in_process_predict_ms']:.2f} ms")
    log(f"OpenAI stream: {results['stream'].summary()}")
    log(textwrap.fill(note, width=100))
    payload = {
        "machine": machine_info(torch=torch.__version__, torch_threads=1),
        "sizes": dataclasses.asdict(sizes),
        "note": note,
        "seconds": time.perf_counter() - started,
        "in_process_predict_ms": results["in_process_predict_ms"],
        "load": [dataclasses.asdict(row) for row in results["load"]],
        "history": [dataclasses.asdict(row) for row in results["history"]],
        "affinity": [dataclasses.asdict(row) for row in results["affinity"]],
        "stream": dataclasses.asdict(results["stream"]),
    }
    log(f"wrote {write_json('serve.json', payload)}")
    markdown_path = RESULTS_DIR / "serve.md"
    markdown_path.write_text(markdown(tables, note))
    log(f"wrote {markdown_path}")


if __name__ == "__main__":
    main(sys.argv[1:])
