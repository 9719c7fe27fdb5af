"""The Ray Serve application: an ingress, the model, and the session store, three deployments.

    serve run serve.app:build_app model_uri=models:/memlab-champion@champion
    serve deploy cluster/serve-config.yaml

- `MemlabIngress` (FastAPI, `serve.api`): the HTTP surface, the API key and every request check,
  before any model work. It calls the model deployment and turns its failures into JSON: a model
  replica that dies mid-request is a 503 with `Retry-After`, not the proxy's plain-text 500.
- `MemlabModel`: rebuilds the model from the MLflow registry (`serve.loading`), runs every forward
  pass through one `@serve.batch` queue on a worker thread (`serve.batching`), and keeps hot
  copies of the sessions it serves (`serve.sessions`). Requests for one session are routed to the
  replica holding it: Serve's model multiplexing keyed by session id.
- `MemlabSessions` (`serve.store`): the durable copy of every session, scoped to the application.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from serve.api import build_api
from serve.args import ServeArgs
from serve.batching import Step, StepResult, run_steps
from serve.gateway import Gateway, ModelFacts
from serve.loading import load_served_config, load_served_model, served_name
from serve.sampling import Sampling
from serve.schema import GenerateRequest
from serve.service import MemlabService, Store
from serve.store import SessionStore, StoreLimits

__all__ = ["INGRESS", "MODEL", "MemlabIngress", "MemlabModel", "ServeArgs", "app_for", "build_app"]

INGRESS, MODEL = "MemlabIngress", "MemlabModel"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# Session ids a replica announces as held, for routing; its hot copies are bounded by bytes.
ROUTED_SESSIONS_PER_REPLICA = 1024
logger = logging.getLogger("ray.serve")


@serve.deployment(name=MODEL)
class MemlabModel:
    def __init__(self, args: ServeArgs, store: DeploymentHandle) -> None:
        torch.set_num_threads(args.deployment.torch_threads)
        self.args = args
        self.served = load_served_model(args.model_uri, args.tracking_uri)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memlab-forward")
        self._batched.set_max_batch_size(args.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(args.batching.wait_timeout_s)
        replica = serve.get_replica_context().replica_id.unique_id
        sessions = Store(store, self.served.model_id)
        self.service = MemlabService(self.served, sessions, args.sessions, self._run, replica)

    async def predict(self, sequences, positions, top_k):
        return await self.service.predict(sequences, positions, top_k)

    async def create_session(self):
        return await self.service.create_session()

    async def inspect(self, session_id: str):
        return await self.service.inspect(session_id)

    async def delete(self, session_id: str) -> None:
        await self._hold_routed()
        await self.service.delete(session_id)

    async def append(self, session_id: str, tokens, top_k: int, request_id: str | None):
        await self._hold_routed()
        return await self.service.append(session_id, tokens, top_k, request_id)

    async def encode(self, session_id: str, context, request_id: str | None):
        await self._hold_routed()
        return await self.service.encode(session_id, context, request_id)

    async def generate(self, session_id: str, request: GenerateRequest, request_id: str | None):
        await self._hold_routed()
        return await self.service.generate(session_id, request, request_id)

    async def complete(self, prompt, sampling: Sampling, n: int, session_id, request_id):
        await self._hold_routed()
        return await self.service.complete(prompt, sampling, n, session_id, request_id)

    async def complete_stream(self, prompt, sampling: Sampling, n: int, session_id):
        """A generator: called with `handle.options(stream=True)`, it streams text pieces."""
        await self._hold_routed()
        async for piece in self.service.complete_stream(prompt, sampling, n, session_id):
            yield dataclasses.replace(piece, memory=None)  # the state stays in the replica

    async def health(self):
        return await self.service.health()

    async def model_card(self):
        return self.service.model_card()

    async def _hold_routed(self) -> None:
        """Announce the request's session as held here, so the router sends its next requests
        to this replica (the multiplexed "model" is the session id; the copy is in
        `service.hot`, bounded by bytes)."""
        session_id = serve.get_multiplexed_model_id()
        if session_id:
            await self._routed(session_id)

    @serve.multiplexed(max_num_models_per_replica=ROUTED_SESSIONS_PER_REPLICA)
    async def _routed(self, session_id: str) -> str:
        return session_id

    async def _run(self, step: Step) -> StepResult:
        if self.args.batching.enabled:
            return await self._batched(step)
        return (await self._forward([step]))[0]

    # The sizes here are placeholders: __init__ sets them from `args.batching`.
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    async def _batched(self, steps: list[Step]) -> list[StepResult]:
        return await self._forward(steps)

    async def _forward(self, steps: list[Step]) -> list[StepResult]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.compute, run_steps, self.served.model, steps)


@serve.deployment(name=INGRESS)
@serve.ingress()
class MemlabIngress:
    def __init__(self, args: ServeArgs, model: DeploymentHandle) -> None:
        self.args = args
        self.api_key = args.read_api_key()
        _refuse_an_open_port_without_a_key(self.api_key)
        config = load_served_config(args.model_uri, args.tracking_uri)
        vocab = config.model.vocab_size
        self.facts = ModelFacts(
            vocab_size=vocab,
            reads_bytes=vocab == 256,
            model_id=served_name(args.model_uri),
            model_uri=args.model_uri,
        )
        self.gateway = Gateway(model, args.sessions.affinity)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self.gateway, self.args.limits, self.facts, self.api_key)


def _refuse_an_open_port_without_a_key(api_key: str | None) -> None:
    """Serve's HTTP port has no authentication of its own: beyond loopback, a key is required."""
    if api_key is not None:
        return
    host = _proxy_host()
    if host in LOOPBACK_HOSTS:
        logger.warning("memlab serves without an API key (loopback only): set one to open it up")
        return
    raise RuntimeError(
        f"refusing to serve on {host!r} without an API key: anyone who reaches the port could use "
        "the model. Set MEMLAB_API_KEY where the application is built, or the application's "
        "api_key_file (a file on the cluster, e.g. a mounted secret), or serve on 127.0.0.1"
    )


def _proxy_host() -> str:
    # The HTTP host is Serve-wide (http_options); Ray 2.60 exposes it only on its client.
    from ray.serve.context import _get_global_client

    return _get_global_client().http_config.host


def generation(args: ServeArgs) -> str:
    """Identifies a deployment's arguments (the key included, hashed): the session store of one
    generation is never handed to another (`serve.store`)."""
    key = args.api_key.get_secret_value() if args.api_key else ""
    payload = args.model_dump_json() + hashlib.sha256(key.encode()).hexdigest()
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def app_for(args: ServeArgs) -> Application:
    """The application for `args`, replica options from `args.deployment` (a Serve config
    file's `deployments:` section overrides them)."""
    args = args.resolved()
    settings, sessions = args.deployment, args.sessions
    limits = StoreLimits(
        sessions.max_sessions,
        sessions.max_total_bytes,
        sessions.idle_ttl_s,
        sessions.recent_requests,
    )
    store = SessionStore.bind(limits, generation(args))
    model = MemlabModel.options(
        autoscaling_config={
            "min_replicas": settings.min_replicas,
            "max_replicas": settings.max_replicas,
            "target_ongoing_requests": settings.target_ongoing_requests,
        },
        max_ongoing_requests=settings.max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        ray_actor_options={"num_cpus": settings.replica_cpus},
        # A model that fails to load fails the same way again: give up soon.
        max_constructor_retry_count=3,
    ).bind(args, store)
    return MemlabIngress.options(
        num_replicas=settings.ingress_replicas,
        # Parsing and checking requests is light; the model deployment queues and refuses load.
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": 0},
        max_constructor_retry_count=3,
    ).bind(args, model)


def build_app(args: dict[str, Any]) -> Application:
    """The application builder `serve run` and Serve config files call (`serve.app:build_app`).

    `args` is validated into `ServeArgs`: a misspelt key fails the deployment at once.
    """
    return app_for(ServeArgs.model_validate(args))
