"""What each endpoint does, with no HTTP in it: predictions, sessions, generation, the model card.

A replica owns one `MemlabService`. Model work goes through `run` (the replica's batching queue);
session state goes to and from the shared store. Every client mistake raises a `ServeError` with
its status, so the HTTP layer only translates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import ray
import torch
from torch import Tensor

from serve import codec
from serve.args import Limits, SessionSettings
from serve.batching import Step, StepResult
from serve.errors import (
    InvalidField,
    ServeError,
    SessionConflict,
    SessionNotFound,
    TooLarge,
    Unavailable,
    retry_after,
)
from serve.loading import ServedModel, card_config, state_bytes_per_sequence
from serve.schema import (
    AppendRequest,
    AppendResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    PositionPrediction,
    PredictRequest,
    PredictResponse,
    SequencePrediction,
    SessionInfo,
    TopK,
)
from serve.store import Snapshot

Runner = Callable[[Step], Awaitable[StepResult]]
# Session ids are uuid4 hex; anything longer is unknown without asking the store.
MAX_SESSION_ID = 64


class Store:
    """The replica's handle on the shared store: calls with the store's refusals unwrapped.

    If the store actor died, the next call gets a new (empty) one from `connect`: sessions are
    lost then, and say so with 404, but the service keeps working.
    """

    def __init__(self, connect: Callable[[], Any], model_id: str) -> None:
        self.connect = connect
        self.handle = connect()  # ray.actor.ActorHandle of serve.store.SessionStore
        self.model_id = model_id

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, ServeError):
                raise error.cause from None
            raise
        except ray.exceptions.RayActorError as error:
            self.handle = self.connect()
            raise Unavailable("the session store was restarted; retry", retry_after(1)) from error


class MemlabService:
    def __init__(
        self,
        served: ServedModel,
        store: Store,
        limits: Limits,
        sessions: SessionSettings,
        run: Runner,
        replica: str = "local",
    ) -> None:
        self.served = served
        self.store = store
        self.limits = limits
        self.sessions = sessions
        self.run = run
        self.replica = replica
        self.template = codec.empty(served.model)

    async def predict(self, request: PredictRequest) -> PredictResponse:
        self._check_size(len(request.sequences), sum(len(s) for s in request.sequences))
        top_k = self._top_k(request.top_k)
        for index, sequence in enumerate(request.sequences):
            self._check_tokens(sequence, ["body", "sequences", index])
        positions = request.positions or [[-1] for _ in request.sequences]
        for index, (wanted, sequence) in enumerate(zip(positions, request.sequences, strict=True)):
            self._check_positions(wanted, len(sequence), index)
        steps = [Step(torch.tensor(s), self.template.state) for s in request.sequences]
        results = await asyncio.gather(*(self.run(step) for step in steps))
        return PredictResponse(
            results=[
                SequencePrediction(predictions=_at_positions(result.logits, wanted, top_k))
                for result, wanted in zip(results, positions, strict=True)
            ]
        )

    async def create_session(self) -> SessionInfo:
        blob = codec.encode(self.template)
        snapshot = await self.store.call("create", blob, _meta(self.template), self.store.model_id)
        return self._info(snapshot)

    async def inspect(self, session_id: str) -> SessionInfo:
        self._check_id(session_id)
        return self._info(await self.store.call("peek", session_id, self.store.model_id))

    async def delete(self, session_id: str) -> None:
        self._check_id(session_id)
        await self.store.call("delete", session_id)

    async def append(self, session_id: str, request: AppendRequest) -> AppendResponse:
        tokens = self._request_tokens(request)
        top_k = self._top_k(request.top_k)
        self._check_id(session_id)
        async with self._leased(session_id) as lease:
            memory = codec.decode(lease.snapshot.blob, self.served.model)
            result = await self.run(Step(torch.tensor(tokens), memory.state))
            updated = codec.SessionMemory(
                result.state, result.logits[-1], memory.tokens_seen + len(tokens)
            )
            await lease.commit(updated)
        return AppendResponse(
            session_id=session_id,
            appended=len(tokens),
            tokens_seen=updated.tokens_seen,
            answers=result.logits.argmax(-1).tolist(),
            next=_top(result.logits[-1], top_k),
            state_bytes=updated.state.nbytes(),
        )

    async def generate(self, session_id: str, request: GenerateRequest) -> GenerateResponse:
        self._check_generate(request)
        self._check_id(session_id)
        if not request.advance:
            snapshot = await self.store.call("read", session_id, self.store.model_id)
            memory = codec.decode(snapshot.blob, self.served.model)
            tokens, _ = await self._continue(memory, request)
            return self._generated(session_id, tokens, memory.tokens_seen)
        async with self._leased(session_id) as lease:
            memory = codec.decode(lease.snapshot.blob, self.served.model)
            tokens, updated = await self._continue(memory, request)
            await lease.commit(updated)
        return self._generated(session_id, tokens, updated.tokens_seen)

    def _generated(self, session_id: str, tokens: list[int], seen: int) -> GenerateResponse:
        text = bytes(tokens).decode("utf-8", errors="replace") if self.served.reads_bytes else None
        return GenerateResponse(session_id=session_id, tokens=tokens, text=text, tokens_seen=seen)

    async def _continue(
        self, memory: codec.SessionMemory, request: GenerateRequest
    ) -> tuple[list[int], codec.SessionMemory]:
        """Sample `max_new_tokens` one at a time; with `advance`, feed the last one in too."""
        if memory.next_logits is None:
            raise SessionConflict("the session has read nothing yet: append tokens first")
        generator = None if request.seed is None else torch.Generator().manual_seed(request.seed)
        state, logits, tokens = memory.state, memory.next_logits, []
        for index in range(request.max_new_tokens):
            token = _sample(logits, request.temperature, request.top_k, generator)
            tokens.append(token)
            if index == request.max_new_tokens - 1 and not request.advance:
                break
            result = await self.run(Step(torch.tensor([token]), state))
            state, logits = result.state, result.logits[-1]
        return tokens, codec.SessionMemory(state, logits, memory.tokens_seen + len(tokens))

    def model_card(self) -> ModelCard:
        served, source = self.served, self.served.provenance
        return ModelCard(
            model_uri=source.model_uri,
            mechanism=served.config.model.memory.kind,
            task=served.config.data.task.kind,
            vocab_size=served.vocab_size,
            parameters=served.model.num_parameters(),
            state_bytes_per_sequence=state_bytes_per_sequence(served),
            config=card_config(served.config),
            metrics=source.metrics,
            run_id=source.run_id,
            registered_model=source.registered_model,
            version=source.version,
            version_tags=source.version_tags,
            text_input=served.reads_bytes,
        )

    async def health(self) -> Health:
        try:
            sessions = await asyncio.wait_for(self.store.call("count"), timeout=2.0)
        except (ServeError, TimeoutError):
            sessions = None
        status = "ok" if sessions is not None else "degraded"
        uri = self.served.provenance.model_uri
        return Health(status=status, model_uri=uri, replica=self.replica, sessions=sessions)

    def _check_size(self, sequences: int, tokens: int) -> None:
        limits = self.limits
        if sequences > limits.max_sequences_per_request:
            raise TooLarge(
                f"{sequences} sequences in one request; at most {limits.max_sequences_per_request}"
            )
        if tokens > limits.max_tokens_per_request:
            raise TooLarge(
                f"{tokens} tokens in one request; at most {limits.max_tokens_per_request}: "
                "send them in several requests (a session keeps the memory between them)"
            )

    def _check_tokens(self, tokens: list[int], loc: list[str | int]) -> None:
        vocab = self.served.vocab_size
        for index, token in enumerate(tokens):
            if not 0 <= token < vocab:
                raise InvalidField(
                    [*loc, index], f"token {token} is outside the vocabulary [0, {vocab})"
                )

    def _check_positions(self, positions: list[int], length: int, index: int) -> None:
        if not positions:
            raise InvalidField(["body", "positions", index], "give at least one position")
        if len(positions) > length:
            raise InvalidField(
                ["body", "positions", index], f"{len(positions)} positions for {length} tokens"
            )
        for inner, position in enumerate(positions):
            if not -length <= position < length:
                raise InvalidField(
                    ["body", "positions", index, inner],
                    f"position {position} is outside a sequence of {length} tokens",
                )

    def _top_k(self, asked: int) -> int:
        """`top_k` within the limit, and no more than the vocabulary has."""
        if asked > self.limits.max_top_k:
            raise InvalidField(["body", "top_k"], f"top_k={asked} exceeds {self.limits.max_top_k}")
        return min(asked, self.served.vocab_size)

    def _check_generate(self, request: GenerateRequest) -> None:
        if request.max_new_tokens > self.limits.max_new_tokens:
            raise InvalidField(
                ["body", "max_new_tokens"],
                f"max_new_tokens={request.max_new_tokens} exceeds {self.limits.max_new_tokens}",
            )
        if request.top_k is not None:
            self._top_k(request.top_k)

    def _request_tokens(self, request: AppendRequest) -> list[int]:
        if request.text is not None:
            tokens = text_tokens(request.text, self.served.vocab_size)
            self._check_size(1, len(tokens))
            return tokens
        assert request.tokens is not None  # the schema asks for exactly one of the two
        self._check_size(1, len(request.tokens))
        self._check_tokens(request.tokens, ["body", "tokens"])
        return request.tokens

    def _check_id(self, session_id: str) -> None:
        if len(session_id) > MAX_SESSION_ID:
            raise SessionNotFound(f"no session {session_id[:MAX_SESSION_ID]}...")

    def _info(self, snapshot: Snapshot) -> SessionInfo:
        return SessionInfo(
            session_id=snapshot.session_id,
            idle_ttl_s=self.sessions.idle_ttl_s,
            version=snapshot.version,
            **snapshot.meta,
        )

    def _leased(self, session_id: str) -> _Lease:
        return _Lease(self, session_id)


class _Lease:
    """`async with`: the session's lease for one update; released if the update never commits."""

    def __init__(self, service: MemlabService, session_id: str) -> None:
        self.service = service
        self.session_id = session_id
        self.snapshot: Snapshot
        self.committed = False

    async def __aenter__(self) -> _Lease:
        settings, limits = self.service.sessions, self.service.limits
        # A lease outlives the request's own deadline a little, never much more.
        lease_s = limits.request_timeout_s + 1.0
        store = self.service.store
        self.snapshot = await store.call(
            "lease", self.session_id, store.model_id, lease_s, settings.lock_wait_s
        )
        return self

    async def commit(self, memory: codec.SessionMemory) -> None:
        if memory.state.nbytes() > self.service.sessions.max_session_bytes:
            raise TooLarge(
                f"the session's state would grow to {memory.state.nbytes():,} bytes, over the "
                f"limit of {self.service.sessions.max_session_bytes:,}; start a new session"
            )
        blob = codec.encode(memory)
        await self.service.store.call(
            "commit", self.session_id, self.snapshot.lease, blob, _meta(memory)
        )
        self.committed = True

    async def __aexit__(self, *exc_info: object) -> None:
        if not self.committed:
            # Shielded: a cancelled request (timeout, client gone) still gives the lease back.
            await asyncio.shield(
                self.service.store.call("release", self.session_id, self.snapshot.lease)
            )


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


def _meta(memory: codec.SessionMemory) -> dict[str, Any]:
    """What the store keeps beside the bytes, so inspecting a session needs no decoding."""
    state = memory.state
    return {
        "tokens_seen": memory.tokens_seen,
        "state_bytes": state.nbytes(),
        "live_slots": [int(layer.live_entries().sum()) for layer in state.layers],
        "memory": state.metrics(),
    }


def _top(logits: Tensor, k: int) -> TopK:
    probs, tokens = logits.float().softmax(-1).topk(k)
    return TopK(tokens=tokens.tolist(), probs=probs.tolist())


def _at_positions(logits: Tensor, positions: list[int], k: int) -> list[PositionPrediction]:
    length = logits.shape[0]
    out = []
    for position in positions:
        row = logits[position]
        top = _top(row, k)
        out.append(PositionPrediction(position=position % length, answer=top.tokens[0], top=top))
    return out


def _sample(
    logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> int:
    if temperature == 0.0:
        return int(logits.argmax())
    # A tiny temperature is greedy in effect; the floor keeps the division finite.
    scaled = logits.float() / max(temperature, 1e-3)
    if top_k is not None and top_k < scaled.shape[0]:
        floor = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < floor, float("-inf"))
    return int(torch.multinomial(scaled.softmax(-1), 1, generator=generator))
