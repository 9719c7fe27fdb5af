"""The ingress's side of the model deployment: what it knows of the served model, and its calls
to the model replicas, with a session's requests routed to the replica that holds it and Ray's
failures turned into the API's JSON refusals."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import ray
from ray.serve.exceptions import BackPressureError, RequestCancelledError

from serve.errors import InvalidField, ServeError, Unavailable, retry_after
from serve.schema import IDEMPOTENCY_HEADER


@dataclass(frozen=True)
class ModelFacts:
    """What the ingress knows of the served model: its vocabulary (to check requests) and the
    names it answers to (the OpenAI API's `model`)."""

    vocab_size: int
    reads_bytes: bool
    model_id: str = "memlab"
    model_uri: str = ""


class Gateway:
    """The ingress's calls to the model deployment: a session's requests go to the replica that
    holds it (multiplexing keyed by session id), and Ray's failures become JSON refusals."""

    def __init__(self, handle: Any, affinity: bool) -> None:
        self.handle = handle  # ray.serve.handle.DeploymentHandle of serve.app.MemlabModel
        self.affinity = affinity

    async def call(self, method: str, *args: Any, session_id: str | None = None) -> Any:
        handle = self.handle
        if session_id is not None and self.affinity:
            handle = handle.options(multiplexed_model_id=session_id)
        with _refusals():
            return await getattr(handle, method).remote(*args)

    async def stream(
        self, method: str, *args: Any, session_id: str | None = None
    ) -> AsyncIterator[Any]:
        """A streaming call: the items the model deployment's generator method yields."""
        handle = self.handle.options(stream=True)
        if session_id is not None and self.affinity:
            handle = handle.options(multiplexed_model_id=session_id)
        with _refusals():
            async for item in getattr(handle, method).remote(*args):
                yield item


@contextmanager
def _refusals() -> Iterator[None]:
    """Ray's failures of a call to the model deployment, as the API's JSON refusals."""
    try:
        yield
    except ray.exceptions.RayTaskError as error:
        if isinstance(error.cause, ServeError):
            raise error.cause from None
        raise
    except BackPressureError:
        raise Unavailable("the model is at capacity; retry", retry_after(1)) from None
    except (ray.exceptions.RayActorError, RequestCancelledError) as error:
        raise Unavailable(
            "the replica serving this request stopped before answering; retry (an append "
            f"sent with an {IDEMPOTENCY_HEADER} is applied at most once)",
            retry_after(1),
        ) from error


def text_tokens(text: str, vocab_size: int) -> list[int]:
    """UTF-8 bytes as tokens, for byte-level models (vocabulary 256) only."""
    if vocab_size != 256:
        raise InvalidField(
            ["body", "text"],
            f"this model reads tokens from a vocabulary of {vocab_size}, not text; send 'tokens'",
        )
    try:
        return list(text.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate ("\ud800") is valid JSON but not Unicode text
        raise InvalidField(["body", "text"], "text is not valid Unicode") from None
