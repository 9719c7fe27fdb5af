"""The HTTP surface: FastAPI routes over a `MemlabService`, with the safety rules around them.

- an API key (`X-API-Key`) on every route but `/healthz` (the docs and `/openapi.json`
  included), when one is configured, compared in constant time and never logged;
- bodies over `limits.max_body_bytes` answered 413 before they are parsed;
- schema errors 422 naming the field (without echoing the input back), refusals from the service
  with their own status, and a per-request deadline (503 with `Retry-After` when it passes).

The app is built per replica (`__serve_build_asgi_app__`), since it closes over that replica's
service and the deployment's arguments.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, HTTPException, Response, Security, status
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.args import Limits
from serve.errors import InvalidField, ServeError, Unavailable, retry_after
from serve.schema import (
    API_KEY_HEADER,
    AppendRequest,
    AppendResponse,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    PredictRequest,
    PredictResponse,
    SessionInfo,
)
from serve.service import MemlabService

T = TypeVar("T")

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (401, 404, 409, 410, 413, 422, 503)
}


def build_api(service: MemlabService, limits: Limits, api_key: str | None) -> FastAPI:
    app = FastAPI(
        title="memlab",
        summary="Sequence models with memory: stateless predictions and stateful sessions.",
        version="1",
        responses=_ERRORS,
        # Served below behind the key like every other route, not by FastAPI's open defaults.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    _add_error_handlers(app)
    guarded = [Depends(_key_check(api_key))]
    deadline = limits.request_timeout_s

    @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=guarded)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="memlab API")

    @app.get("/healthz", tags=["service"])
    async def health() -> Health:
        """Liveness and the session store's reachability; needs no API key."""
        return await service.health()

    @app.get("/v1/model", tags=["service"], dependencies=guarded)
    async def model_card() -> ModelCard:
        """The served model: mechanism, config, metrics, MLflow run and registry version."""
        return service.model_card()

    @app.post("/v1/predict", tags=["stateless"], dependencies=guarded)
    async def predict(body: PredictRequest) -> PredictResponse:
        """Read each sequence from empty memory and report the predictions at `positions`."""
        return await _within(deadline, service.predict(body))

    @app.post(
        "/v1/sessions", status_code=status.HTTP_201_CREATED, tags=["sessions"], dependencies=guarded
    )
    async def create_session() -> SessionInfo:
        """A new session with empty memory."""
        return await _within(deadline, service.create_session())

    @app.get("/v1/sessions/{session_id}", tags=["sessions"], dependencies=guarded)
    async def inspect_session(session_id: str) -> SessionInfo:
        """Tokens read, state bytes and live memory slots of a session."""
        return await _within(deadline, service.inspect(session_id))

    @app.post("/v1/sessions/{session_id}/append", tags=["sessions"], dependencies=guarded)
    async def append(session_id: str, body: AppendRequest) -> AppendResponse:
        """Feed tokens (or text) into the session's memory; predictions for what was appended."""
        return await _within(deadline, service.append(session_id, body))

    @app.post("/v1/sessions/{session_id}/generate", tags=["sessions"], dependencies=guarded)
    async def generate(session_id: str, body: GenerateRequest) -> GenerateResponse:
        """Continue the session; with `advance` the continuation joins its memory."""
        return await _within(deadline, service.generate(session_id, body))

    @app.delete(
        "/v1/sessions/{session_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        tags=["sessions"],
        dependencies=guarded,
    )
    async def delete_session(session_id: str) -> Response:
        """Forget the session and its memory."""
        await _within(deadline, service.delete(session_id))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return app


async def _within(seconds: float, work: Awaitable[T]) -> T:
    try:
        return await asyncio.wait_for(work, timeout=seconds)
    except TimeoutError:
        raise Unavailable(
            f"the request did not finish within {seconds:g} s; the server is busy, retry later",
            retry_after(1),
        ) from None


def _key_check(api_key: str | None):
    header = APIKeyHeader(name=API_KEY_HEADER, auto_error=False)

    # A default, not an annotation: annotations here are strings that cannot see `header`.
    async def check(given: str | None = Security(header)) -> None:
        if api_key is None:
            return
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                detail=f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
                headers={"WWW-Authenticate": "ApiKey"},
            )

    return check


def _add_error_handlers(app: FastAPI) -> None:
    async def refused(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, ServeError)
        if isinstance(error, InvalidField):
            return _invalid([{"loc": error.loc, "msg": error.detail, "type": "value_error"}])
        return JSONResponse({"detail": error.detail}, error.status, headers=error.headers)

    async def invalid(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        # FastAPI's default echoes the input (and may fail to encode it); the place and the
        # message are what a client needs.
        return _invalid(
            [
                {"loc": [_plain(p) for p in item["loc"]], "msg": item["msg"], "type": item["type"]}
                for item in error.errors()
            ]
        )

    app.add_exception_handler(ServeError, refused)
    app.add_exception_handler(RequestValidationError, invalid)


def _invalid(errors: list[dict[str, Any]]) -> JSONResponse:
    return JSONResponse({"detail": errors}, status.HTTP_422_UNPROCESSABLE_CONTENT)


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
