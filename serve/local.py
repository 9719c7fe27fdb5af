"""Run the application on this machine's Ray: start, wait until it answers, stop.

Serve's HTTP proxy is started on loopback unless told otherwise. Its host and port are fixed for
the life of the Ray cluster by whoever starts Serve first; `start_local` refuses to report a URL
the proxy is not listening on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx
from ray import serve

from serve.app import app_for
from serve.args import ServeArgs
from serve.loading import check_model_uri
from serve.store import kill_store, store_name

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
    _wait_healthy(url, timeout_s)
    return url


def stop_local(name: str = "memlab", *, store: str | None = None) -> None:
    """Delete application `name` and its session store (`store`: a custom store name)."""
    serve.delete(name)
    kill_store(store or store_name(name))


def _wait_healthy(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
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


def serve_until_interrupted(
    args: ServeArgs,
    *,
    host: str = LOOPBACK,
    port: int = 8000,
    name: str = "memlab",
    on_ready: Callable[[str], None] = print,
) -> None:
    """`memlab serve`: the app on the Ray this process uses, `on_ready(url)`, then wait for
    Ctrl-C and delete the application and its session store."""
    try:
        on_ready(start_local(args, host=host, port=port, name=name))
        while True:
            time.sleep(3600)  # Ctrl-C interrupts the sleep
    except KeyboardInterrupt:
        pass
    finally:
        stop_local(name, store=args.sessions.store_name)
