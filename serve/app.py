"""The Ray Serve application: one deployment, a FastAPI ingress, batched forward passes.

    serve run serve.app:build_app model_uri=models:/memlab-champion@champion
    serve deploy cluster/serve-config.yaml

Each replica rebuilds the model from the MLflow registry (`serve.loading`), keeps sessions in the
shared store (`serve.store`) and runs every forward pass through one `@serve.batch` queue, so
concurrent requests and sessions share passes (`serve.batching`). Forward passes run on one
worker thread per replica, off the event loop, which keeps accepting and queueing requests.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from fastapi import FastAPI
from ray import serve
from ray.serve import Application

from serve.api import build_api
from serve.args import ServeArgs
from serve.batching import Step, StepResult, run_steps
from serve.loading import load_served_model
from serve.service import MemlabService, Store
from serve.store import StoreLimits, session_store, store_name

__all__ = ["DEPLOYMENT_NAME", "MemlabServer", "ServeArgs", "app_for", "build_app"]

DEPLOYMENT_NAME = "MemlabModel"


@serve.deployment(name=DEPLOYMENT_NAME)
@serve.ingress()
class MemlabServer:
    def __init__(self, args: ServeArgs) -> None:
        torch.set_num_threads(args.deployment.torch_threads)
        self.args = args
        self.served = load_served_model(args.model_uri, args.tracking_uri)
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memlab-forward")
        self._batched.set_max_batch_size(args.batching.max_batch_size)
        self._batched.set_batch_wait_timeout_s(args.batching.wait_timeout_s)
        context = serve.get_replica_context()
        sessions = args.sessions
        name = sessions.store_name or store_name(context.app_name)
        limits = StoreLimits(sessions.max_sessions, sessions.max_total_bytes, sessions.idle_ttl_s)
        store = Store(lambda: session_store(name, limits), self.served.model_id)
        replica = context.replica_id.unique_id
        self.service = MemlabService(self.served, store, args.limits, sessions, self._run, replica)

    def __serve_build_asgi_app__(self) -> FastAPI:
        key = self.args.api_key.get_secret_value() if self.args.api_key else None
        return build_api(self.service, self.args.limits, key)

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


def app_for(args: ServeArgs) -> Application:
    """The application for `args`, replica options from `args.deployment` (a Serve config
    file's `deployments:` section overrides them)."""
    args = args.resolved()
    settings = args.deployment
    deployment = MemlabServer.options(
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
    )
    return deployment.bind(args)


def build_app(args: dict[str, Any]) -> Application:
    """The application builder `serve run` and Serve config files call (`serve.app:build_app`).

    `args` is validated into `ServeArgs`: a misspelt key fails the deployment at once.
    """
    return app_for(ServeArgs.model_validate(args))
