"""The session store: the durable copy of every session, in a deployment of its own.

Sessions outlive model replicas (autoscaling adds and removes them, a crash restarts one), so the
authoritative state of a session lives here, and every update is written here before it is
acknowledged (write-through). Model replicas keep hot copies (`serve.sessions`) and prove them
current by the version they carry.

Scoped to the application: the store is a deployment of the same application, so `serve delete`,
`serve shutdown`, the end of `serve run` and Ctrl-C or SIGTERM on `memlab serve` end it with every
session in it, and a redeployment with other arguments (another model, another key: a new
`generation`) starts an empty one; sessions never pass from one deployment to the next. A store
replica that crashes is restarted empty: its sessions then answer 404.

Bounded: at most `max_sessions` sessions and `max_total_bytes` of state; the least recently used
session goes first, and a session idle for `idle_ttl_s` expires. An evicted or expired session
answers 410 (for a while; the record of gone ids is bounded too), an unknown one 404.

Consistency without locks: an update is computed on a version of the session and committed only if
the session is still at that version; otherwise the store answers with the current snapshot and
the caller redoes its work on it. Nothing is held between calls, so a replica that dies in the
middle of a request blocks nobody.

Safe retries: a commit may carry the request's idempotency key. The store remembers the last
`recent_requests` keys of each session with the response acknowledged for them; a retried request
(same key) gets that response back and changes nothing, so a client that saw an error (its replica
died after the commit) may retry without applying its tokens twice.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ray import serve

from serve.errors import SessionGone, SessionNotFound, Unavailable, retry_after

# How many ids of gone sessions are remembered, to answer 410 rather than 404.
GONE_MEMORY = 10_000


@dataclass(frozen=True)
class StoreLimits:
    max_sessions: int
    max_total_bytes: int
    idle_ttl_s: float
    recent_requests: int = 64


@dataclass(frozen=True)
class Snapshot:
    """A session as a replica sees it: the encoded memory and what the store knows of it."""

    session_id: str
    blob: bytes
    meta: dict[str, Any]
    version: int


@dataclass(frozen=True)
class Commit:
    """What a commit did: stored as `version`; or `replayed`, the response already acknowledged
    for this idempotency key (nothing changed); or `current`, the newer snapshot it lost to."""

    version: int
    replayed: bytes | None = None
    current: Snapshot | None = None


@dataclass
class _Entry:
    blob: bytes
    meta: dict[str, Any]
    model_id: str
    last_used: float
    version: int = 0
    recent: OrderedDict[str, bytes] = field(default_factory=OrderedDict)

    def snapshot(self, session_id: str) -> Snapshot:
        return Snapshot(session_id, self.blob, self.meta, self.version)


@dataclass
class SessionTable:
    """The store's bookkeeping, with no Ray in it: LRU order, expiry, versions, gone ids.

    `clock` is injectable so expiry can be tested without sleeping.
    """

    limits: StoreLimits
    clock: Callable[[], float] = time.monotonic
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    _gone: OrderedDict[str, str] = field(default_factory=OrderedDict)
    _bytes: int = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        return self._bytes

    def create(self, blob: bytes, meta: dict[str, Any], model_id: str) -> Snapshot:
        self._expire()
        self._make_room(1, len(blob), keep=None)
        session_id = uuid.uuid4().hex
        self._entries[session_id] = _Entry(blob, meta, model_id, self.clock())
        self._bytes += len(blob)
        return Snapshot(session_id, blob, meta, 0)

    def read(self, session_id: str, model_id: str) -> Snapshot:
        return self._touch(session_id, model_id).snapshot(session_id)

    def peek(self, session_id: str, model_id: str) -> Snapshot:
        """Like `read` without the bytes of the state (inspecting a session, checking its
        version)."""
        return replace(self.read(session_id, model_id), blob=b"")

    def commit(
        self,
        session_id: str,
        model_id: str,
        expected_version: int,
        blob: bytes,
        meta: dict[str, Any],
        request_id: str | None = None,
        response: bytes = b"",
    ) -> Commit:
        """Store the new state if the session is still at `expected_version`."""
        entry = self._touch(session_id, model_id)
        if request_id is not None and request_id in entry.recent:
            return Commit(entry.version, replayed=entry.recent[request_id])
        if entry.version != expected_version:
            return Commit(entry.version, current=entry.snapshot(session_id))
        self._make_room(0, len(blob) - len(entry.blob), keep=session_id)
        self._bytes += len(blob) - len(entry.blob)
        entry.blob, entry.meta, entry.version = blob, meta, entry.version + 1
        if request_id is not None:
            entry.recent[request_id] = response
            while len(entry.recent) > self.limits.recent_requests:
                entry.recent.popitem(last=False)
        return Commit(entry.version)

    def delete(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            raise self._missing(session_id)
        self._bytes -= len(entry.blob)

    def _touch(self, session_id: str, model_id: str) -> _Entry:
        self._expire()
        entry = self._entries.get(session_id)
        if entry is None:
            raise self._missing(session_id)
        if entry.model_id != model_id:
            raise SessionGone(
                "this session was made by another model version; create a new session"
            )
        entry.last_used = self.clock()
        self._entries.move_to_end(session_id)
        return entry

    def _expire(self) -> None:
        """Drop sessions idle longer than the TTL; they sit at the front of the LRU order."""
        deadline = self.clock() - self.limits.idle_ttl_s
        while self._entries:
            session_id, entry = next(iter(self._entries.items()))
            if entry.last_used > deadline:
                return
            self._drop(session_id, f"expired after {self.limits.idle_ttl_s:g} s without use")

    def _make_room(self, sessions: int, nbytes: int, keep: str | None) -> None:
        """Evict least recently used sessions (not `keep`) until `sessions` more sessions and
        `nbytes` more bytes fit; `Unavailable`, evicting nothing, if they cannot."""
        limits = self.limits
        count, total = len(self._entries) + sessions, self._bytes + nbytes
        victims: list[str] = []
        candidates = iter(self._entries.items())  # least recently used first
        while count > limits.max_sessions or total > limits.max_total_bytes:
            session_id, entry = next(candidates, (None, None))
            if entry is None:
                raise Unavailable(
                    f"no room in the session store ({limits.max_sessions} sessions, "
                    f"{limits.max_total_bytes:,} bytes at most); retry later",
                    retry_after(1),
                )
            if session_id != keep:
                victims.append(session_id)
                count, total = count - 1, total - len(entry.blob)
        for session_id in victims:
            self._drop(session_id, "evicted to make room (least recently used)")

    def _drop(self, session_id: str, reason: str) -> None:
        entry = self._entries.pop(session_id)
        self._bytes -= len(entry.blob)
        self._gone[session_id] = reason
        while len(self._gone) > GONE_MEMORY:
            self._gone.popitem(last=False)

    def _missing(self, session_id: str) -> Exception:
        reason = self._gone.get(session_id)
        if reason is not None:
            return SessionGone(f"session {session_id} is gone: {reason}")
        return SessionNotFound(f"no session {session_id}")


@serve.deployment(
    name="MemlabSessions",
    num_replicas=1,  # one authoritative copy; model replicas scale, the store does not
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=1000,  # every call is a dictionary operation: never make one queue
)
class SessionStore:
    """The deployment around a `SessionTable`. `generation` identifies the deployment's arguments:
    when they change, Serve replaces this replica, and the sessions go with it."""

    def __init__(self, limits: StoreLimits, generation: str) -> None:
        self.table = SessionTable(limits)
        self.generation = generation

    async def create(self, blob: bytes, meta: dict[str, Any], model_id: str) -> Snapshot:
        return self.table.create(blob, meta, model_id)

    async def read(self, session_id: str, model_id: str) -> Snapshot:
        return self.table.read(session_id, model_id)

    async def peek(self, session_id: str, model_id: str) -> Snapshot:
        return self.table.peek(session_id, model_id)

    async def commit(self, session_id: str, model_id: str, *args: Any) -> Commit:
        return self.table.commit(session_id, model_id, *args)

    async def delete(self, session_id: str) -> None:
        self.table.delete(session_id)

    async def count(self) -> int:
        return len(self.table)
