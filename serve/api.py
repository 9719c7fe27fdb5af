"""The HTTP surface, run by the ingress deployment: FastAPI routes over the model deployment.

- an API key (`X-API-Key`) on every route but `/healthz` (the docs and `/openapi.json` included)
  when one is configured, compared in constant time and never logged; when none is, the OpenAPI
  document asks for none;
- requests checked here, before any model work: schemas carry the application's limits and the
  model's vocabulary (so `/openapi.json` states them), sizes beyond a limit get 413, malformed
  JSON 400, schema errors 422 naming the field (without echoing the input back);
- every failure is a JSON body `{"detail": ...}`: refusals with their own status, and when the
  model replica serving a request dies, is overloaded or misses the deadline, 503 with
  `Retry-After`. An append or generation sent with an `Idempotency-Key` is applied at most once,
  so such a retry is always safe.

(No `from __future__ import annotations` here: the routes' body types are built per application
at run time, and FastAPI must see them as classes, not names.)
"""

import asyncio
import hmac
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Header, HTTPException, Response, Security, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from pydantic import Field, StrictInt, create_model
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.args import Limits
from serve.errors import (
    InvalidField,
    ServeError,
    SessionNotFound,
    TooLarge,
    Unavailable,
    retry_after,
)
from serve.gateway import Gateway, ModelFacts, text_tokens
from serve.openai_api import add_openai_routes, openai_error
from serve.schema import (
    API_KEY_HEADER,
    IDEMPOTENCY_HEADER,
    MAX_IDEMPOTENCY_KEY,
    AppendRequest,
    AppendResponse,
    EncodeRequest,
    EncodeResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    PredictRequest,
    PredictResponse,
    SessionInfo,
    TokensOrText,
)

T = TypeVar("T")
# Session ids are uuid4 hex; anything longer is unknown without asking the store.
MAX_SESSION_ID = 64
NOT_JSON = {
    "loc": ["body"],
    "msg": "the request body is not valid JSON (send it with Content-Type: application/json)",
    "type": "json_invalid",
}
_ERROR_STATUSES = {
    400: "malformed JSON",
    404: "no such session",
    409: "the session is busy, or has read nothing yet",
    410: "the session expired, was evicted or was made by another model",
    413: "the request is over a size limit (body bytes, tokens, sequences)",
    422: "a field is missing, misspelt or out of range (its place is in `detail`)",
    503: "overloaded, past the deadline, or the replica stopped: retry after `Retry-After`",
}


@dataclass(frozen=True)
class RequestModels:
    """The request bodies with this application's limits and vocabulary in their schema."""

    predict: type[PredictRequest]
    append: type[AppendRequest]
    encode: type[EncodeRequest]
    generate: type[GenerateRequest]


def request_models(limits: Limits, facts: ModelFacts) -> RequestModels:
    token = Annotated[StrictInt, Field(ge=0, lt=facts.vocab_size)]
    tokens_limit = {"maxItems": limits.max_tokens_per_request}  # beyond: 413, not 422
    top_k = Annotated[int, Field(ge=1, le=limits.max_top_k)]
    sequence = Annotated[list[token], Field(min_length=1, json_schema_extra=tokens_limit)]
    predict = create_model(
        "PredictRequest",
        __base__=PredictRequest,
        sequences=(
            list[sequence],
            Field(min_length=1, json_schema_extra={"maxItems": limits.max_sequences_per_request}),
        ),
        top_k=(top_k, 5),
    )
    append = create_model(
        "AppendRequest",
        __base__=AppendRequest,
        tokens=(sequence | None, None),
        top_k=(top_k, 5),
    )
    context_limit = {"maxItems": limits.max_context_tokens}  # beyond: 413
    context = Annotated[list[token], Field(min_length=1, json_schema_extra=context_limit)]
    encode = create_model("EncodeRequest", __base__=EncodeRequest, tokens=(context | None, None))
    generate = create_model(
        "GenerateRequest",
        __base__=GenerateRequest,
        max_new_tokens=(int, Field(16, ge=1, le=limits.max_new_tokens)),
        top_k=(top_k | None, None),
    )
    return RequestModels(predict, append, encode, generate)


def build_api(gateway: Gateway, limits: Limits, facts: ModelFacts, api_key: str | None) -> FastAPI:
    app = FastAPI(
        title="memlab",
        summary="Sequence models with memory: stateless predictions and stateful sessions.",
        version="1",
        responses={code: {"model": ErrorBody, "description": d} for code, d in _errors(api_key)},
        # Served below behind the key like every other route, not by FastAPI's open defaults.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    _add_error_handlers(app)
    guarded = [Depends(_key_check(api_key))] if api_key is not None else []
    bodies = request_models(limits, facts)
    checks = Checks(limits, facts)
    deadline = limits.request_timeout_s
    Idempotency = Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_HEADER,
            max_length=MAX_IDEMPOTENCY_KEY,
            description="a client-chosen id of this update: a retry with the same id is "
            "answered with the first attempt's result and applied at most once",
        ),
    ]

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="memlab API")

    @app.get("/healthz", tags=["service"])
    async def health() -> Health:
        """Liveness and the session store's reachability; never needs a key."""
        return await _within(deadline, gateway.call("health"))

    @app.get("/v1/model", tags=["service"], dependencies=guarded)
    async def model_card() -> ModelCard:
        """The served model: mechanism, config, metrics, MLflow run and registry version."""
        return await _within(deadline, gateway.call("model_card"))

    @app.post("/v1/predict", tags=["stateless"], dependencies=guarded)
    async def predict(body: bodies.predict) -> PredictResponse:
        """Read each sequence from empty memory and report the predictions at `positions`."""
        positions = checks.predict(body)
        call = gateway.call("predict", body.sequences, positions, body.top_k)
        return PredictResponse(results=await _within(deadline, call))

    @app.post(
        "/v1/sessions", status_code=status.HTTP_201_CREATED, tags=["sessions"], dependencies=guarded
    )
    async def create_session() -> SessionInfo:
        """A new session with empty memory."""
        return await _within(deadline, gateway.call("create_session"))

    @app.get("/v1/sessions/{session_id}", tags=["sessions"], dependencies=guarded)
    async def inspect_session(session_id: str) -> SessionInfo:
        """Tokens read, state bytes and live memory slots of a session."""
        checks.session_id(session_id)
        return await _within(deadline, gateway.call("inspect", session_id, session_id=session_id))

    @app.post("/v1/sessions/{session_id}/append", tags=["sessions"], dependencies=guarded)
    async def append(
        session_id: str, body: bodies.append, request_id: Idempotency = None
    ) -> AppendResponse:
        """Feed tokens (or text) into the session's memory; predictions for what was appended."""
        checks.session_id(session_id)
        tokens = checks.append_tokens(body)
        call = gateway.call(
            "append", session_id, tokens, body.top_k, request_id, session_id=session_id
        )
        return await _within(deadline, call)

    @app.post("/v1/sessions/{session_id}/encode", tags=["sessions"], dependencies=guarded)
    async def encode(
        session_id: str, body: bodies.encode, request_id: Idempotency = None
    ) -> EncodeResponse:
        """Encoder-decoder models: write a context into the session's memory once; later appends
        and generations read it without sending it again."""
        checks.session_id(session_id)
        context = checks.context_tokens(body)
        call = gateway.call("encode", session_id, context, request_id, session_id=session_id)
        return await _within(deadline, call)

    @app.post("/v1/sessions/{session_id}/generate", tags=["sessions"], dependencies=guarded)
    async def generate(
        session_id: str, body: bodies.generate, request_id: Idempotency = None
    ) -> GenerateResponse:
        """Continue the session; with `advance` the continuation joins its memory."""
        checks.session_id(session_id)
        request = GenerateRequest.model_validate(body.model_dump())
        call = gateway.call("generate", session_id, request, request_id, session_id=session_id)
        return await _within(deadline, call)

    @app.delete(
        "/v1/sessions/{session_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        tags=["sessions"],
        dependencies=guarded,
    )
    async def delete_session(session_id: str) -> Response:
        """Forget the session and its memory."""
        checks.session_id(session_id)
        await _within(deadline, gateway.call("delete", session_id, session_id=session_id))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    add_openai_routes(app, gateway, limits, facts, guarded)
    return app


def _errors(api_key: str | None) -> list[tuple[int, str]]:
    codes = dict(_ERROR_STATUSES)
    if api_key is not None:
        codes[401] = f"missing or wrong API key (send it in the {API_KEY_HEADER} header)"
    return sorted(codes.items())


class Checks:
    """The request checks the schemas cannot express: totals over a request, positions against
    lengths, text as bytes."""

    def __init__(self, limits: Limits, facts: ModelFacts) -> None:
        self.limits = limits
        self.facts = facts

    def predict(self, body: PredictRequest) -> list[list[int]]:
        """Size limits, then each sequence's positions resolved (default: its last)."""
        self.size(len(body.sequences), sum(len(s) for s in body.sequences))
        wanted = body.positions or [[-1] for _ in body.sequences]
        for index, (positions, sequence) in enumerate(zip(wanted, body.sequences, strict=True)):
            self._positions(positions, len(sequence), index)
        return wanted

    def append_tokens(self, body: AppendRequest) -> list[int]:
        tokens = self._tokens(body)
        self.size(1, len(tokens))
        return tokens

    def context_tokens(self, body: EncodeRequest) -> list[int]:
        tokens = self._tokens(body)
        if len(tokens) > self.limits.max_context_tokens:
            raise TooLarge(
                f"{len(tokens)} context tokens; at most {self.limits.max_context_tokens} per encode"
            )
        return tokens

    def _tokens(self, body: TokensOrText) -> list[int]:
        if body.text is not None:
            return text_tokens(body.text, self.facts.vocab_size)
        assert body.tokens is not None  # the schema asks for exactly one of the two
        return body.tokens

    def size(self, sequences: int, tokens: int) -> None:
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

    def session_id(self, session_id: str) -> None:
        if len(session_id) > MAX_SESSION_ID:
            raise SessionNotFound(f"no session {session_id[:MAX_SESSION_ID]}...")

    def _positions(self, positions: list[int], length: int, index: int) -> None:
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


async def _within(seconds: float, work) -> T:
    try:
        return await asyncio.wait_for(work, timeout=seconds)
    except TimeoutError:
        raise Unavailable(
            f"the request did not finish within {seconds:g} s; the server is busy, retry later",
            retry_after(1),
        ) from None


def _key_check(api_key: str):
    """The key in `X-API-Key`, or as a bearer token (`Authorization: Bearer <key>`, what OpenAI
    clients send), compared in constant time."""
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)
    bearer = HTTPBearer(auto_error=False, description="the same key, as OpenAI clients send it")

    async def check(
        given: Annotated[str | None, Security(header)] = None,
        token: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)] = None,
    ) -> None:
        offered = given if given is not None else (token.credentials if token else None)
        if offered is None or not hmac.compare_digest(offered.encode(), api_key.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail=f"missing or wrong API key: send it in the {API_KEY_HEADER} header "
                "(or as Authorization: Bearer)",
                headers={"WWW-Authenticate": "ApiKey"},
            )

    return check


def _add_error_handlers(app: FastAPI) -> None:
    async def refused(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ServeError)
        if isinstance(error, InvalidField):
            errors = [{"loc": error.loc, "msg": error.detail, "type": "value_error"}]
            return _invalid(request, errors)
        body = openai_error(request.url.path, {"detail": error.detail}, error.status)
        return JSONResponse(body, error.status, headers=error.headers)

    async def invalid(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        # FastAPI's default echoes the input (and may fail to encode it); the place and the
        # message are what a client needs.
        errors = [
            {"loc": [_plain(p) for p in item["loc"]], "msg": item["msg"], "type": item["type"]}
            for item in error.errors()
        ]
        if any(_not_json(item) for item in error.errors()):
            body = openai_error(request.url.path, {"detail": [NOT_JSON]}, 400)
            return JSONResponse(body, status.HTTP_400_BAD_REQUEST)
        return _invalid(request, errors)

    app.add_exception_handler(ServeError, refused)
    app.add_exception_handler(RequestValidationError, invalid)


def _not_json(error: dict[str, Any]) -> bool:
    """A body that does not parse as JSON: malformed JSON, or raw text sent without a JSON
    content type (which FastAPI hands on unparsed)."""
    raw_text = error["loc"] == ("body",) and isinstance(error.get("input"), str | bytes)
    return error["type"] == "json_invalid" or raw_text


def _invalid(request: Request, errors: list[dict[str, Any]]) -> JSONResponse:
    code = status.HTTP_422_UNPROCESSABLE_CONTENT
    return JSONResponse(openai_error(request.url.path, {"detail": errors}, code), code)


def _plain(part: object) -> str | int:
    return part if isinstance(part, int) else str(part)


class BodyLimit:
    """413 for a body over `max_bytes`: at once from `Content-Length`, else while it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                # FastAPI passes an HTTPException raised while reading the body through as is.
                raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self._detail())
            return message

        await self.app(scope, counted, send)

    def _detail(self) -> str:
        return f"the request body exceeds {self.max_bytes:,} bytes"

    async def _too_large(self, send: Send) -> None:
        response = JSONResponse({"detail": self._detail()}, status.HTTP_413_CONTENT_TOO_LARGE)
        await response({"type": "http"}, _nothing, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _nothing() -> Message:
    return {"type": "http.disconnect"}
