"""What can go wrong for a client, each with its HTTP status, in one place.

The session store raises these inside its actor and the service raises them in replicas; the API
turns any of them into a JSON body `{"detail": ...}` with the status and headers they carry, so no
client mistake ever reaches the server's 500 path.
"""

from __future__ import annotations


class ServeError(Exception):
    """A refusal with a status code. `headers` carries e.g. `Retry-After`."""

    status: int = 400

    def __init__(self, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}

    def __reduce__(self):
        # Crosses the Ray actor boundary: rebuild with the same detail and headers.
        return (type(self), (self.detail, self.headers))


class SessionNotFound(ServeError):
    status = 404


class SessionGone(ServeError):
    """Expired after its idle time, evicted to make room, or made by another model."""

    status = 410


class SessionBusy(ServeError):
    """Another request holds the session for longer than this one was willing to wait."""

    status = 409


class SessionConflict(ServeError):
    """The request's state is no longer the session's (e.g. the session is empty)."""

    status = 409


class BadRequest(ServeError):
    """A request the server understood but will not carry out (an unsupported option)."""

    status = 400


class TooLarge(ServeError):
    status = 413


class Unavailable(ServeError):
    """Full, overloaded or timed out: the client should retry later."""

    status = 503


class InvalidField(ServeError):
    """A value that passed the schema but not the model (a token outside the vocabulary...).

    Answered like FastAPI's own validation errors, with the field's location.
    """

    status = 422

    def __init__(self, loc: list[str | int], message: str) -> None:
        super().__init__(message)
        self.loc = loc

    def __reduce__(self):
        return (type(self), (self.loc, self.detail))


def retry_after(seconds: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, round(seconds)))}
