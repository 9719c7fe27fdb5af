"""`MemlabClient`: the HTTP API as typed Python calls (httpx, synchronous).

    with MemlabClient("http://127.0.0.1:8000", api_key=...) as client:
        session = client.create_session()
        client.append(session.session_id, text="def main():")
        print(client.generate(session.session_id, max_new_tokens=32).text)

A refusal raises `MemlabHTTPError` with the status, the server's `detail` and its `Retry-After`.
"""

from __future__ import annotations

from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from serve.schema import (
    API_KEY_HEADER,
    AppendRequest,
    AppendResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelCard,
    PredictRequest,
    PredictResponse,
    SessionInfo,
)

R = TypeVar("R", bound=BaseModel)


class MemlabHTTPError(RuntimeError):
    def __init__(self, status: int, detail: Any, retry_after: float | None) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class MemlabClient:
    def __init__(self, base_url: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    def __enter__(self) -> MemlabClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def health(self) -> Health:
        return self._call("GET", "/healthz", Health)

    def model_card(self) -> ModelCard:
        return self._call("GET", "/v1/model", ModelCard)

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
    ) -> AppendResponse:
        body = AppendRequest(tokens=tokens, text=text, top_k=top_k)
        return self._call("POST", f"/v1/sessions/{session_id}/append", AppendResponse, body)

    def generate(
        self,
        session_id: str,
        max_new_tokens: int = 16,
        temperature: float = 0.0,
        top_k: int | None = None,
        seed: int | None = None,
        advance: bool = True,
    ) -> GenerateResponse:
        body = GenerateRequest(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            advance=advance,
        )
        return self._call("POST", f"/v1/sessions/{session_id}/generate", GenerateResponse, body)

    def inspect(self, session_id: str) -> SessionInfo:
        return self._call("GET", f"/v1/sessions/{session_id}", SessionInfo)

    def delete(self, session_id: str) -> None:
        self._send("DELETE", f"/v1/sessions/{session_id}")

    def _call(self, method: str, path: str, answer: type[R], body: BaseModel | None = None) -> R:
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        return answer.model_validate(self._send(method, path, payload).json())

    def _send(self, method: str, path: str, payload: dict | None = None) -> httpx.Response:
        response = self.http.request(method, path, json=payload)
        if response.is_success:
            return response
        raise MemlabHTTPError(response.status_code, _detail(response), _retry_after(response))


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
