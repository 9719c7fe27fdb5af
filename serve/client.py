"""`MemlabClient`: the HTTP API as typed Python calls (httpx, synchronous).

    with MemlabClient("http://127.0.0.1:8000", api_key=...) as client:
        session = client.create_session()
        client.append(session.session_id, text="def main():")
        print(client.generate(session.session_id, max_new_tokens=32).text)

A refusal raises `MemlabHTTPError` with the status, the server's `detail` and its `Retry-After`.

Appends and generations carry an `Idempotency-Key` (a fresh one per call, or yours), so the client
retries them safely: after a 503 or 409 (waiting for `Retry-After`), a 500 or a dropped connection,
the same key is sent again and the server applies the update at most once. `retries` sets how many
times (default 1); reads are retried the same way.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from serve.schema import (
    API_KEY_HEADER,
    IDEMPOTENCY_HEADER,
    AppendRequest,
    AppendResponse,
    EncodeRequest,
    EncodeResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    PredictRequest,
    PredictResponse,
    SessionInfo,
)

R = TypeVar("R", bound=BaseModel)
# Answers after which the same request may simply be sent again.
RETRYABLE = {409, 500, 502, 503, 504}
MAX_WAIT_S = 5.0


class MemlabHTTPError(RuntimeError):
    def __init__(self, status: int, detail: Any, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class MemlabClient:
    def __init__(
        self, base_url: str, api_key: str | None = None, timeout: float = 60.0, retries: int = 1
    ) -> None:
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)
        self.retries = retries

    def __enter__(self) -> MemlabClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> Health:
        return self._call("GET", "/healthz", Health, retry=True)

    def model_card(self) -> ModelCard:
        return self._call("GET", "/v1/model", ModelCard, retry=True)

    def predict(
        self, sequences: list[list[int]], top_k: int = 5, positions: list[list[int]] | None = None
    ) -> PredictResponse:
        body = PredictRequest(sequences=sequences, top_k=top_k, positions=positions)
        return self._call("POST", "/v1/predict", PredictResponse, body)

    def create_session(self) -> SessionInfo:
        return self._call("POST", "/v1/sessions", SessionInfo)

    def append(
        self,
        session_id: str,
        tokens: list[int] | None = None,
        text: str | None = None,
        top_k: int = 5,
        request_id: str | None = None,
    ) -> AppendResponse:
        body = AppendRequest(tokens=tokens, text=text, top_k=top_k)
        path = f"/v1/sessions/{session_id}/append"
        return self._call("POST", path, AppendResponse, body, retry=True, request_id=request_id)

    def encode(
        self,
        session_id: str,
        tokens: list[int] | None = None,
        text: str | None = None,
        request_id: str | None = None,
    ) -> EncodeResponse:
        """Write a context into an encoder-decoder session's memory (once, then ask many times)."""
        body = EncodeRequest(tokens=tokens, text=text)
        path = f"/v1/sessions/{session_id}/encode"
        return self._call("POST", path, EncodeResponse, body, retry=True, request_id=request_id)

    def generate(
        self,
        session_id: str,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        advance: bool = True,
        request_id: str | None = None,
    ) -> GenerateResponse:
        body = GenerateRequest(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            advance=advance,
        )
        path = f"/v1/sessions/{session_id}/generate"
        return self._call("POST", path, GenerateResponse, body, retry=True, request_id=request_id)

    def inspect(self, session_id: str) -> SessionInfo:
        return self._call("GET", f"/v1/sessions/{session_id}", SessionInfo, retry=True)

    def delete(self, session_id: str) -> None:
        self._send("DELETE", f"/v1/sessions/{session_id}")

    def _call(
        self,
        method: str,
        path: str,
        answer: type[R],
        body: BaseModel | None = None,
        retry: bool = False,
        request_id: str | None = None,
    ) -> R:
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        headers = {}
        if method == "POST" and retry:
            headers[IDEMPOTENCY_HEADER] = request_id or uuid.uuid4().hex
        attempts = 1 + (self.retries if retry else 0)
        response = self._send(method, path, payload, headers, attempts)
        return answer.model_validate(response.json())

    def _send(
        self,
        method: str,
        path: str,
        payload: dict | None = None,
        headers: dict[str, str] | None = None,
        attempts: int = 1,
    ) -> httpx.Response:
        for attempt in range(attempts):
            last = attempt == attempts - 1
            try:
                response = self.http.request(method, path, json=payload, headers=headers)
            except httpx.TransportError:
                if last:
                    raise
                continue
            if response.is_success:
                return response
            error = MemlabHTTPError(response.status_code, _detail(response), _retry_after(response))
            if last or response.status_code not in RETRYABLE:
                raise error
            time.sleep(min(error.retry_after or 0.1, MAX_WAIT_S))
        raise AssertionError("unreachable")


def _detail(response: httpx.Response) -> Any:
    try:
        data = response.json()
    except ValueError:
        return response.text
    return data.get("detail", data) if isinstance(data, dict) else data


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
