"""What a model replica does, with no HTTP in it: predictions, sessions, generation.

The ingress (`serve.api`) has already checked every request against the limits and the model's
vocabulary; here the work is done. Model passes go through `run` (the replica's batching queue);
sessions are kept hot in the replica (`serve.sessions`) and committed to the shared store
(`serve.store`) before a request is acknowledged. An update commits only on the version it read;
if another replica committed first, the update is redone on the newer state. A commit may carry the
request's idempotency key, so a retried request is answered, not applied again.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import ray
import torch
from torch import Tensor

from serve import codec
from serve.args import SessionSettings
from serve.batching import Step, StepResult
from serve.errors import (
    BadRequest,
    ServeError,
    SessionBusy,
    SessionConflict,
    TooLarge,
    Unavailable,
    retry_after,
)
from serve.loading import ServedModel, card_config, state_bytes_per_sequence
from serve.sampling import Sampling, TextStream, sample
from serve.schema import (
    AppendResponse,
    CompletionChoice,
    CompletionResult,
    EncodeResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    PositionPrediction,
    SequencePrediction,
    SessionInfo,
    TopK,
)
from serve.sessions import HotSession, HotSessions
from serve.store import Commit, Snapshot

Runner = Callable[[Step], Awaitable[StepResult]]
# Attempts of one update that keeps losing to updates from other replicas.
UPDATE_ATTEMPTS = 3


class Store:
    """The replica's handle on the store deployment: calls with the store's refusals unwrapped."""

    def __init__(self, handle: Any, model_id: str) -> None:
        self.handle = handle  # ray.serve.handle.DeploymentHandle of serve.store.SessionStore
        self.model_id = model_id

    async def call(self, method: str, *args: Any) -> Any:
        try:
            return await getattr(self.handle, method).remote(*args)
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, ServeError):
                raise error.cause from None
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as error:
            raise Unavailable("the session store is restarting; retry", retry_after(1)) from error


class MemlabService:
    def __init__(
        self,
        served: ServedModel,
        store: Store,
        sessions: SessionSettings,
        run: Runner,
        replica: str = "local",
    ) -> None:
        self.served = served
        self.store = store
        self.settings = sessions
        self.run = run
        self.replica = replica
        self.template = codec.empty(served.model)
        self.hot = HotSessions(sessions.hot_bytes_per_replica, sessions.lock_wait_s)

    async def predict(
        self, sequences: list[list[int]], positions: list[list[int]], top_k: int
    ) -> list[SequencePrediction]:
        """Each sequence read from empty memory; predictions at `positions` (resolved)."""
        steps = [Step(torch.tensor(s), self.template.state) for s in sequences]
        results = await asyncio.gather(*(self.run(step) for step in steps))
        return [
            SequencePrediction(predictions=_at_positions(result.logits, wanted, top_k))
            for result, wanted in zip(results, positions, strict=True)
        ]

    async def create_session(self) -> SessionInfo:
        blob = codec.encode(self.template)
        snapshot = await self.store.call("create", blob, _meta(self.template), self.store.model_id)
        return self._info(snapshot)

    async def inspect(self, session_id: str) -> SessionInfo:
        return self._info(await self.store.call("peek", session_id, self.store.model_id))

    async def delete(self, session_id: str) -> None:
        self.hot.drop(session_id)
        await self.store.call("delete", session_id)

    async def append(
        self, session_id: str, tokens: list[int], top_k: int, request_id: str | None
    ) -> AppendResponse:
        async def step(memory: codec.SessionMemory):
            result = await self.run(Step(torch.tensor(tokens), memory.state))
            updated = codec.SessionMemory(
                result.state, result.logits[-1], memory.tokens_seen + len(tokens)
            )
            answer = AppendResponse(
                session_id=session_id,
                appended=len(tokens),
                tokens_seen=updated.tokens_seen,
                answers=result.logits.argmax(-1).tolist(),
                next=_top(result.logits[-1], top_k),
                state_bytes=updated.state.nbytes(),
            )
            return updated, answer

        return await self._update(session_id, request_id, step, AppendResponse)

    async def encode(
        self, session_id: str, context: list[int], request_id: str | None
    ) -> EncodeResponse:
        """Write a context into an encoder-decoder session's memory (encode once): it replaces
        the encoded memory; what the decoder has read stays. Later appends read it."""
        encoder = getattr(self.served.model, "encode", None)
        if encoder is None:
            raise BadRequest(
                "this model has no encoder (model.architecture is decoder_only): append the "
                "context instead"
            )

        async def step(memory: codec.SessionMemory):
            encoded = await asyncio.to_thread(_encoded, encoder, context)
            updated = dataclasses.replace(memory, state=memory.state.with_memory(encoded))
            answer = EncodeResponse(
                session_id=session_id,
                context_tokens=len(context),
                slots=int(encoded.live_entries().sum()),
                state_bytes=updated.state.nbytes(),
            )
            return updated, answer

        return await self._update(session_id, request_id, step, EncodeResponse)

    async def generate(
        self, session_id: str, request: GenerateRequest, request_id: str | None
    ) -> GenerateResponse:
        async def step(memory: codec.SessionMemory):
            tokens, updated = await self._continue(memory, request)
            seen = updated.tokens_seen if request.advance else memory.tokens_seen
            return updated, self._generated(session_id, tokens, seen)

        if request.advance:
            return await self._update(session_id, request_id, step, GenerateResponse)
        copy = await self.hot.loaded(session_id, self._load)
        _, answer = await step(await self._current(copy))
        return answer

    async def _update(self, session_id: str, request_id: str | None, step, answer_type):
        """Run `step` on the session's current memory and commit its result on that version;
        redo it on the newer state when another replica committed first."""
        async with self.hot.locked(session_id, self._load) as copy:
            for _ in range(UPDATE_ATTEMPTS):
                updated, answer = await step(copy.memory)
                commit = await self._commit(copy, updated, request_id, answer)
                if commit.replayed is not None:
                    copy.forget()  # this copy may predate the replayed update: reload next time
                    return answer_type.model_validate_json(commit.replayed)
                if commit.current is None:
                    copy.keep(updated, commit.version)
                    return answer
                copy.keep(*self._decoded(commit.current))
        raise SessionBusy("the session kept changing under this update; retry", retry_after(0))

    async def _commit(
        self, copy: HotSession, memory: codec.SessionMemory, request_id: str | None, answer
    ) -> Commit:
        if memory.state.nbytes() > self.settings.max_session_bytes:
            raise TooLarge(
                f"the session's state would grow to {memory.state.nbytes():,} bytes, over the "
                f"limit of {self.settings.max_session_bytes:,}; start a new session"
            )
        return await self.store.call(
            "commit",
            copy.session_id,
            self.store.model_id,
            copy.version,
            codec.encode(memory),
            _meta(memory),
            request_id,
            answer.model_dump_json().encode(),
        )

    async def _load(self, session_id: str) -> tuple[codec.SessionMemory, int]:
        return self._decoded(await self.store.call("read", session_id, self.store.model_id))

    def _decoded(self, snapshot: Snapshot) -> tuple[codec.SessionMemory, int]:
        return codec.decode(snapshot.blob, self.served.model), snapshot.version

    async def _current(self, copy: HotSession) -> codec.SessionMemory:
        """The memory a read-only request works on: the hot copy's, once the store confirms its
        version (another replica may have committed since), else the store's newer one."""
        memory, version = copy.memory, copy.version
        current = await self.store.call("peek", copy.session_id, self.store.model_id)
        if current.version != version:
            memory, version = await self._load(copy.session_id)
            if version > copy.version:
                copy.keep(memory, version)
        return memory

    def _generated(self, session_id: str, tokens: list[int], seen: int) -> GenerateResponse:
        text = bytes(tokens).decode("utf-8", errors="replace") if self.served.reads_bytes else None
        return GenerateResponse(session_id=session_id, tokens=tokens, text=text, tokens_seen=seen)

    async def _continue(
        self, memory: codec.SessionMemory, request: GenerateRequest
    ) -> tuple[list[int], codec.SessionMemory]:
        """Sample `max_new_tokens` one at a time; with `advance`, feed the last one in too."""
        sampling = Sampling(
            request.max_new_tokens, request.temperature, request.top_k, seed=request.seed
        )
        _require_something_read(memory)
        generator = sampling.generator()
        state, logits, tokens = memory.state, memory.next_logits, []
        for index in range(request.max_new_tokens):
            token = sample(logits, sampling, generator)
            tokens.append(token)
            if index == request.max_new_tokens - 1 and not request.advance:
                break
            result = await self.run(Step(torch.tensor([token]), state))
            state, logits = result.state, result.logits[-1]
        return tokens, codec.SessionMemory(state, logits, memory.tokens_seen + len(tokens))

    async def complete(
        self, prompt: list[int], sampling: Sampling, n: int, session_id: str | None, request_id
    ) -> CompletionResult:
        """Text completions (the OpenAI-compatible API). Without a session: `n` continuations
        of the prompt read from empty memory. With one: the prompt is appended to the session,
        one continuation is generated and joins its memory, committed like an append."""

        async def continued(memory: codec.SessionMemory):
            read = await self._read(memory, prompt)
            choices, after = [], read
            for index in range(n):
                pieces = [piece async for piece in self._text(read, sampling, index)]
                text = "".join(piece.text for piece in pieces)
                choices.append(CompletionChoice(index=index, text=text, **pieces[-1].ending()))
                after = pieces[-1].memory
            return after, CompletionResult(prompt_tokens=len(prompt), choices=choices)

        if session_id is None:
            return (await continued(self.template))[1]
        return await self._update(session_id, request_id, continued, CompletionResult)

    async def complete_stream(
        self, prompt: list[int], sampling: Sampling, n: int, session_id: str | None
    ) -> AsyncIterator[TextPiece]:
        """`complete`, piece by piece as the tokens come: every `TextPiece` carries its choice's
        index; the last of each choice its finish reason. A session is committed at the end."""
        if session_id is None:
            read = await self._read(self.template, prompt)
            for index in range(n):
                async for piece in self._text(read, sampling, index):
                    yield piece
            return
        async with self.hot.locked(session_id, self._load) as copy:
            read = await self._read(copy.memory, prompt)
            async for piece in self._text(read, sampling, 0):
                if piece.finish_reason is not None:
                    commit = await self._commit(copy, piece.memory, None, None)
                    if commit.current is not None:
                        copy.forget()
                        raise SessionBusy("the session changed during this stream; retry")
                    copy.keep(piece.memory, commit.version)
                yield piece

    async def _read(self, memory: codec.SessionMemory, tokens: list[int]) -> codec.SessionMemory:
        """`memory` after reading `tokens` (none: as it is, if it has read anything)."""
        if not tokens:
            _require_something_read(memory)
            return memory
        result = await self.run(Step(torch.tensor(tokens), memory.state))
        return codec.SessionMemory(
            result.state, result.logits[-1], memory.tokens_seen + len(tokens)
        )

    async def _text(
        self, memory: codec.SessionMemory, sampling: Sampling, index: int
    ) -> AsyncIterator[TextPiece]:
        """One sampled continuation as text pieces; each generated token joins the memory."""
        stream, generator = TextStream(sampling.stop), sampling.generator(index)
        state, logits, seen = memory.state, memory.next_logits, memory.tokens_seen
        for count in range(1, sampling.max_tokens + 1):
            token = sample(logits, sampling, generator)
            result = await self.run(Step(torch.tensor([token]), state))
            state, logits, seen = result.state, result.logits[-1], seen + 1
            text = stream.add(token)
            if stream.done or count == sampling.max_tokens:
                reason = "stop" if stream.done else "length"
                after = codec.SessionMemory(state, logits, seen)
                yield TextPiece(index, text + stream.finish(), count, reason, after)
                return
            if text:
                yield TextPiece(index, text, count)

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

    def _info(self, snapshot: Snapshot) -> SessionInfo:
        return SessionInfo(
            session_id=snapshot.session_id,
            idle_ttl_s=self.settings.idle_ttl_s,
            version=snapshot.version,
            **snapshot.meta,
        )


def _meta(memory: codec.SessionMemory) -> dict[str, Any]:
    """What the store keeps beside the bytes, so inspecting a session needs no decoding."""
    state = memory.state
    return {
        "tokens_seen": memory.tokens_seen,
        "state_bytes": state.nbytes(),
        "live_slots": [int(part.live_entries().sum()) for part in state.memories()],
        "memory": state.metrics(),
    }


def _top(logits: Tensor, k: int) -> TopK:
    probs, tokens = logits.float().softmax(-1).topk(k)
    return TopK(tokens=tokens.tolist(), probs=probs.tolist())


def _at_positions(logits: Tensor, positions: list[int], k: int) -> list[PositionPrediction]:
    length = logits.shape[0]
    out = []
    for position in positions:
        top = _top(logits[position], k)
        out.append(PositionPrediction(position=position % length, answer=top.tokens[0], top=top))
    return out


@torch.inference_mode()
def _encoded(encode: Callable[[Tensor], Any], context: list[int]) -> Any:
    return encode(torch.tensor([context]))


def _require_something_read(memory: codec.SessionMemory) -> None:
    if memory.next_logits is None:
        raise SessionConflict("the session has read nothing yet: append tokens first")


@dataclasses.dataclass(frozen=True)
class TextPiece:
    """Text generated for choice `index` so far (`tokens` counts them); the last piece of a
    choice has its `finish_reason` and the memory after it."""

    index: int
    text: str
    tokens: int
    finish_reason: str | None = None
    memory: codec.SessionMemory | None = None

    def ending(self) -> dict[str, Any]:
        return {"finish_reason": self.finish_reason, "completion_tokens": self.tokens}
