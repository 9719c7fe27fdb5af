"""An OpenAI-compatible text API beside the native one, for byte-level (text-trained) models.

`GET /v1/models`, `POST /v1/completions` and `POST /v1/chat/completions`, blocking or streamed as
server-sent events (`stream: true`), with usage counts; any OpenAI client works against it:

    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=key)  # the key: X-API-Key too
    client.completions.create(model="memlab-champion", prompt="def ", max_tokens=32)

Supported: `max_tokens` (chat: also `max_completion_tokens`), `temperature`, `top_p`, `stop`, `n`,
`seed`, `stream`, `stream_options.include_usage`, `user`. Fields a byte-level memory model cannot
honour (`logprobs`, `echo`, `best_of` > 1, penalties, `logit_bias`, `suffix`, tools) are refused
with 400 naming them when set to anything but their neutral value; unknown fields with 422.

Memory sessions (the extension): `session_id` (the OpenAI client's `extra_body={"session_id":
...}`, a session made with `POST /v1/sessions`) continues from the server's memory instead of
re-sending history: the prompt (or, in a chat, the new messages only) is appended to the session,
and the reply joins it too. Chat messages are read as text, `"<role>: <content>\\n"` each, then
`"assistant: "`; a reply stops at `max_tokens` or at a `stop` string (the memory then holds the
reply up to and including it).

(No `from __future__ import annotations`: FastAPI must see the body types as classes.)
"""

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from serve.args import Limits
from serve.errors import BadRequest, InvalidField, ServeError, TooLarge
from serve.gateway import Gateway, ModelFacts, text_tokens
from serve.sampling import Sampling
from serve.schema import IDEMPOTENCY_HEADER, MAX_IDEMPOTENCY_KEY, CompletionResult

MAX_CHOICES = 8
MAX_STOP = 4
# Field: its neutral value (what "not used" looks like); any other value is refused.
NEUTRAL = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
    "parallel_tool_calls": (None, False, True),
}


class OpenAIRequest(BaseModel):
    """The fields both endpoints share. Unknown fields are refused; `NEUTRAL` ones pass only at
    their neutral value."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    seed: StrictInt | None = Field(default=None, ge=0, lt=2**63)
    user: str | None = None
    session_id: str | None = Field(
        default=None,
        description="memlab's extension: continue this memory session (POST /v1/sessions)",
        max_length=64,
    )
    logprobs: Any = None
    top_logprobs: Any = None
    echo: Any = None
    best_of: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None
    logit_bias: Any = None

    @model_validator(mode="after")
    def _consistent(self):
        if self.session_id is not None and self.n != 1:
            raise ValueError("n must be 1 with a session_id: one memory takes one continuation")
        if isinstance(self.stop, list) and len(self.stop) > MAX_STOP:
            raise ValueError(f"stop has {len(self.stop)} strings; at most {MAX_STOP}")
        return self

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(OpenAIRequest):
    prompt: str | list[str]
    max_tokens: int = Field(default=16, ge=1)
    suffix: Any = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "developer"]
    content: str
    name: str | None = None


class ChatRequest(OpenAIRequest):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    response_format: Any = None
    parallel_tool_calls: Any = None

    def budget(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16


IdempotencyKey = Annotated[
    str | None, Header(alias=IDEMPOTENCY_HEADER, max_length=MAX_IDEMPOTENCY_KEY)
]


OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")


def openai_error(path: str, body: dict[str, Any], status: int) -> dict[str, Any]:
    """On the OpenAI routes, errors also carry OpenAI's `error` object, whose message OpenAI
    clients show; `detail` stays for memlab's own clients."""
    if not path.endswith(OPENAI_PATHS):
        return body
    detail = body["detail"]
    message = detail if isinstance(detail, str) else json.dumps(detail)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return body | {"error": {"message": message, "type": kind, "code": status}}


def chat_text(messages: list[Message], reply: bool = True) -> str:
    """How a byte-level model reads a chat: one line per message, then the assistant's turn."""
    lines = "".join(f"{message.role}: {message.content}\n" for message in messages)
    return lines + ("assistant: " if reply else "")


def add_openai_routes(
    app: FastAPI,
    gateway: Gateway,
    limits: Limits,
    facts: ModelFacts,
    guarded: list,
) -> None:
    api = OpenAIText(gateway, limits, facts)

    @app.get("/v1/models", tags=["openai"], dependencies=guarded)
    async def models() -> dict:
        """The one model served, as OpenAI's model list."""
        return {"object": "list", "data": [api.model_entry()]}

    @app.post("/v1/completions", tags=["openai"], dependencies=guarded)
    async def completions(
        body: CompletionRequest,
        request_id: str | None = Header(
            None, alias=IDEMPOTENCY_HEADER, max_length=MAX_IDEMPOTENCY_KEY
        ),
    ):
        """Text completion of `prompt` (a string or a list of them), blocking or streamed."""
        return await api.respond(body, _prompts(body.prompt), body.max_tokens, request_id, False)

    @app.post("/v1/chat/completions", tags=["openai"], dependencies=guarded)
    async def chat_completions(
        body: ChatRequest,
        request_id: str | None = Header(
            None, alias=IDEMPOTENCY_HEADER, max_length=MAX_IDEMPOTENCY_KEY
        ),
    ):
        """A chat turn: the messages read as text, the assistant's reply generated."""
        return await api.respond(body, [chat_text(body.messages)], body.budget(), request_id, True)


class OpenAIText:
    def __init__(self, gateway: Gateway, limits: Limits, facts: ModelFacts) -> None:
        self.gateway = gateway
        self.limits = limits
        self.facts = facts
        self.created = int(time.time())

    def model_entry(self) -> dict[str, Any]:
        return {
            "id": self.facts.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "memlab",
        }

    async def respond(self, body: OpenAIRequest, prompts: list[str], budget: int, request_id, chat):
        prompt_tokens = self._check(body, prompts, budget)
        sampling = Sampling(
            max_tokens=budget,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stops(),
            seed=body.seed,
        )
        shape = Shape(chat, body.model, _id("chatcmpl" if chat else "cmpl"), int(time.time()))
        if body.stream:
            return await self._stream(body, prompt_tokens, sampling, shape)
        results = []
        for tokens in prompt_tokens:
            args = (tokens, sampling, body.n, body.session_id, request_id)
            results.append(await self.gateway.call("complete", *args, session_id=body.session_id))
        return shape.response(results, body.n)

    def _check(self, body: OpenAIRequest, prompts: list[str], budget: int) -> list[list[int]]:
        if not self.facts.reads_bytes:
            raise InvalidField(
                ["body", "model"],
                f"the served model reads token ids from a vocabulary of {self.facts.vocab_size}, "
                "not text: use the native API (/v1/sessions, /v1/predict) with tokens",
            )
        if body.model not in (self.facts.model_id, self.facts.model_uri):
            raise ModelNotFound(
                f"model {body.model!r} is not served here; this server serves "
                f"{self.facts.model_id!r} (GET /v1/models)"
            )
        _refuse_non_neutral(body)
        if budget > self.limits.max_new_tokens:
            field = "max_completion_tokens" if isinstance(body, ChatRequest) else "max_tokens"
            raise InvalidField(["body", field], f"{budget} exceeds {self.limits.max_new_tokens}")
        if body.session_id is not None and len(prompts) != 1:
            raise InvalidField(["body", "prompt"], "a session takes one prompt at a time")
        tokens = [text_tokens(prompt, self.facts.vocab_size) for prompt in prompts]
        total = sum(len(t) for t in tokens) + budget * body.n * len(prompts)
        if total > self.limits.max_tokens_per_request:
            raise TooLarge(
                f"the prompts and completions would take {total} tokens; at most "
                f"{self.limits.max_tokens_per_request} per request"
            )
        return tokens

    async def _stream(self, body, prompt_tokens, sampling: Sampling, shape: "Shape"):
        if len(prompt_tokens) != 1:
            raise InvalidField(["body", "prompt"], "stream one prompt at a time")
        args = (prompt_tokens[0], sampling, body.n, body.session_id)
        pieces = self.gateway.stream("complete_stream", *args, session_id=body.session_id)
        first = await anext(pieces, None)  # errors before the first piece keep their status
        include_usage = bool((body.stream_options or {}).get("include_usage"))
        events = shape.events(first, pieces, len(prompt_tokens[0]), body.n, include_usage)
        return StreamingResponse(events, media_type="text/event-stream")


class ModelNotFound(ServeError):
    status = 404


def _refuse_non_neutral(body: OpenAIRequest) -> None:
    used = sorted(
        name
        for name, neutral in NEUTRAL.items()
        if name in body.model_fields_set and getattr(body, name) not in neutral
    )
    if used:
        raise BadRequest(
            f"unsupported by a byte-level memory model: {', '.join(used)}; leave them unset "
            "(supported: max_tokens, temperature, top_p, stop, n, seed, stream, session_id)"
        )


def _prompts(prompt: str | list[str]) -> list[str]:
    return [prompt] if isinstance(prompt, str) else list(prompt)


def _id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class Shape:
    """OpenAI's response and chunk formats for one request."""

    def __init__(self, chat: bool, model: str, response_id: str, created: int) -> None:
        self.chat = chat
        self.head = {"id": response_id, "created": created, "model": model}

    def response(self, results: list[CompletionResult], n: int) -> dict[str, Any]:
        choices, prompt, completion = [], 0, 0
        for prompt_index, result in enumerate(results):
            prompt += result.prompt_tokens
            for choice in result.choices:
                completion += choice.completion_tokens
                index = prompt_index * n + choice.index
                choices.append(self._choice(index, choice.text, choice.finish_reason))
        kind = "chat.completion" if self.chat else "text_completion"
        return self.head | {"object": kind, "choices": choices, "usage": _usage(prompt, completion)}

    def _choice(self, index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            return {"index": index, "message": message, "finish_reason": finish_reason}
        return {"index": index, "text": text, "finish_reason": finish_reason, "logprobs": None}

    async def events(
        self, first, rest: AsyncIterator, prompt_tokens: int, n: int, include_usage: bool
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece, the usage if asked, then `[DONE]`."""
        completion, started = 0, set()
        try:
            piece = first
            while piece is not None:
                if self.chat and piece.index not in started:
                    started.add(piece.index)
                    yield self._event(piece.index, {"role": "assistant", "content": ""}, None)
                if piece.finish_reason is not None:
                    completion += piece.tokens
                yield self._event(piece.index, piece.text, piece.finish_reason)
                piece = await anext(rest, None)
        except ServeError as error:
            failure = {"error": {"message": error.detail, "code": error.status}}
            yield f"data: {json.dumps(failure)}\n\n"
            return
        if include_usage:
            usage = {"choices": [], "usage": _usage(prompt_tokens, completion)}
            yield f"data: {json.dumps(self.head | self._kind() | usage)}\n\n"
        yield "data: [DONE]\n\n"

    def _kind(self) -> dict[str, str]:
        return {"object": "chat.completion.chunk" if self.chat else "text_completion"}

    def _event(self, index: int, content, finish_reason: str | None) -> str:
        if self.chat:
            delta = content if isinstance(content, dict) else {"content": content}
            choice = {"index": index, "delta": delta, "finish_reason": finish_reason}
        else:
            choice = {
                "index": index,
                "text": content,
                "finish_reason": finish_reason,
                "logprobs": None,
            }
        return f"data: {json.dumps(self.head | self._kind() | {'choices': [choice]})}\n\n"


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
