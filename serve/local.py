"""Run the application on this machine's Ray: start, wait until it answers, stop.

Serve's HTTP proxy is started on loopback unless told otherwise. Its host and port are fixed for
the life of the Ray cluster by whoever starts Serve first; `start_local` refuses to report a URL
the proxy is not listening on.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
from ray import serve

from serve.app import app_for
from serve.args import ServeArgs
from serve.loading import check_model_uri

LOOPBACK = "127.0.0.1"


class ServeStartError(RuntimeError):
    """The application did not come up healthy in time."""


def start_local(
    args: ServeArgs,
    *,
    host: str = LOOPBACK,
    port: int = 8000,
    name: str = "memlab",
    route_prefix: str = "/",
    timeout_s: float = 180.0,
) -> str:
    """Deploy `args` as application `name` and return its base URL once `/healthz` answers.

    Ray must already be initialised (`pipelines.runtime.connect()`). A model URI
    that leads nowhere raises `ModelLoadError` before anything is deployed.
    """
    args = args.resolved()
    check_model_uri(args.model_uri, args.tracking_uri)
    # The proxy's own deadline is a little longer than the app's, which answers 503 first.
    timeout = args.limits.request_timeout_s + 5.0
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": timeout})
    serve.run(app_for(args), name=name, route_prefix=route_prefix, blocking=False)
    url = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    _wait_healthy(url, name, timeout_s)
    return url


def stop_local(name: str = "memlab") -> None:
    """Delete application `name`; its session store is one of its deployments and goes with it."""
    serve.delete(name)


def _wait_healthy(url: str, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        _raise_if_failed(name)
        try:
            answer = httpx.get(f"{url}/healthz", timeout=5.0)
            if answer.status_code == 200:
                return
            last = f"HTTP {answer.status_code}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        time.sleep(0.25)
    raise ServeStartError(
        f"{url}/healthz did not answer 200 within {timeout_s:g} s (last: {last}); if Serve was "
        "already running on another host/port, its proxy kept those (serve.shutdown() first)"
    )


def _raise_if_failed(name: str) -> None:
    """A deployment that failed (its model did not load, it refused to start) fails at once."""
    application = serve.status().applications.get(name)
    if application is not None and application.status == "DEPLOY_FAILED":
        raise ServeStartError(f"application {name!r} failed to deploy: {application.message}")


def serve_until_interrupted(
    args: ServeArgs,
    *,
    host: str = LOOPBACK,
    port: int = 8000,
    name: str = "memlab",
    on_ready: Callable[[str], None] = print,
) -> None:
    """`memlab serve`: the app on the Ray this process uses, `on_ready(url)`, then wait for
    Ctrl-C or SIGTERM and delete the application (its sessions with it)."""
    try:
        with _sigterm_interrupts():
            on_ready(start_local(args, host=host, port=port, name=name))
            while True:
                time.sleep(3600)  # Ctrl-C or SIGTERM interrupts the sleep
    except KeyboardInterrupt:
        pass
    finally:
        stop_local(name)


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a service manager, `kill`, a script's cleanup) stops like Ctrl-C, so whatever
    the command started is taken down instead of left running."""

    def interrupt(_signum, _frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
