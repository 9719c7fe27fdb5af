"""The session store every replica shares: a named, detached Ray actor holding encoded states.

Sessions must outlive replicas (autoscaling removes them, a crash restarts them), so no replica
keeps one: each request takes the state from here and gives the new one back. The actor owns the
bytes, so a replica that dies mid-request loses nothing but its own unfinished update.

Bounded: at most `max_sessions` sessions and `max_total_bytes` of state; the least recently used
session goes first, and a session idle for `idle_ttl_s` expires. An evicted or expired session
answers 410 (for a while; the record of gone ids is bounded too), an unknown one 404.

One update at a time per session: an update first takes a lease, which a second update waits for
(up to `lock_wait_s`, then 409 with a retry hint). The lease ends with the commit, with a release,
or on its own after `lease_s`, so a replica that died holding it blocks nobody for long; its late
commit, if any, is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import ray

from serve.errors import SessionBusy, SessionGone, SessionNotFound, Unavailable, retry_after

NAMESPACE = "memlab"
# How many ids of gone sessions are remembered, to answer 410 rather than 404.
GONE_MEMORY = 10_000


@dataclass(frozen=True)
class StoreLimits:
    max_sessions: int
    max_total_bytes: int
    idle_ttl_s: float


@dataclass(frozen=True)
class Snapshot:
    """A session as a replica sees it: the encoded memory and what the store knows of it."""

    session_id: str
    blob: bytes
    meta: dict[str, Any]
    version: int
    lease: str | None = None


@dataclass
class _Entry:
    blob: bytes
    meta: dict[str, Any]
    model_id: str
    last_used: float
    version: int = 0
    lease: str | None = None
    lease_until: float = 0.0


@dataclass
class SessionTable:
    """The store's bookkeeping, with no Ray in it: LRU order, expiry, leases, gone ids.

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
        entry = self._touch(session_id, model_id)
        return Snapshot(session_id, entry.blob, entry.meta, entry.version)

    def peek(self, session_id: str, model_id: str) -> Snapshot:
        """Like `read` without the bytes of the state (inspecting a session)."""
        return replace(self.read(session_id, model_id), blob=b"")

    def try_lease(self, session_id: str, model_id: str, lease_s: float) -> Snapshot:
        """The session with a fresh lease on it; `SessionBusy` while another lease is live."""
        entry = self._touch(session_id, model_id)
        now = self.clock()
        if entry.lease is not None and entry.lease_until > now:
            raise SessionBusy(
                "another update to this session is running; retry",
                retry_after(entry.lease_until - now),
            )
        entry.lease, entry.lease_until = uuid.uuid4().hex, now + lease_s
        return Snapshot(session_id, entry.blob, entry.meta, entry.version, entry.lease)

    def commit(self, session_id: str, lease: str, blob: bytes, meta: dict[str, Any]) -> int:
        """Store the new state under `lease` and end it; returns the new version."""
        entry = self._entries.get(session_id)
        if entry is None:
            raise self._missing(session_id)
        if entry.lease != lease:
            raise SessionBusy(
                "the session changed while this update ran (its lease ran out); retry",
                retry_after(0),
            )
        self._make_room(0, len(blob) - len(entry.blob), keep=session_id)
        self._bytes += len(blob) - len(entry.blob)
        entry.blob, entry.meta, entry.version = blob, meta, entry.version + 1
        entry.lease, entry.last_used = None, self.clock()
        self._entries.move_to_end(session_id)
        return entry.version

    def release(self, session_id: str, lease: str) -> None:
        entry = self._entries.get(session_id)
        if entry is not None and entry.lease == lease:
            entry.lease = None

    def delete(self, session_id: str) -> None:
        entry = self._entries.pop(session_id, None)
        if entry is None:
            raise self._missing(session_id)
        self._bytes -= len(entry.blob)

    def lease_left(self, session_id: str) -> float:
        entry = self._entries.get(session_id)
        return max(0.0, entry.lease_until - self.clock()) if entry and entry.lease else 0.0

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
        """Evict least recently used sessions (not leased, not `keep`) until `sessions` more
        sessions and `nbytes` more bytes fit; `Unavailable`, evicting nothing, if they cannot."""
        limits = self.limits
        count, total = len(self._entries) + sessions, self._bytes + nbytes
        victims: list[str] = []
        now = self.clock()
        candidates = iter(self._entries.items())  # least recently used first
        while count > limits.max_sessions or total > limits.max_total_bytes:
            session_id, entry = next(candidates, (None, None))
            if entry is None:
                raise Unavailable(
                    f"no room in the session store ({limits.max_sessions} sessions, "
                    f"{limits.max_total_bytes:,} bytes at most; sessions being updated are not "
                    "evicted); retry later",
                    retry_after(1),
                )
            if session_id != keep and (entry.lease is None or entry.lease_until <= now):
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


class SessionStore:
    """The actor around a `SessionTable`: async, so an update waiting for a lease blocks no one.

    Created by the first replica that needs it (`session_store`), `num_cpus=0`, detached: it lives
    until `stop_local` (or `ray.kill`) ends it, independent of any replica.
    """

    def __init__(self, limits: StoreLimits) -> None:
        self.table = SessionTable(limits)
        self._changed: asyncio.Condition | None = None

    def _condition(self) -> asyncio.Condition:
        # Made lazily: it must belong to the actor's event loop, which __init__ does not run on.
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def create(self, blob: bytes, meta: dict[str, Any], model_id: str) -> Snapshot:
        return self.table.create(blob, meta, model_id)

    async def read(self, session_id: str, model_id: str) -> Snapshot:
        return self.table.read(session_id, model_id)

    async def peek(self, session_id: str, model_id: str) -> Snapshot:
        return self.table.peek(session_id, model_id)

    async def lease(
        self, session_id: str, model_id: str, lease_s: float, wait_s: float
    ) -> Snapshot:
        """Wait up to `wait_s` for the session's lease; updates run one after another."""
        deadline = time.monotonic() + wait_s
        changed = self._condition()
        while True:
            try:
                return self.table.try_lease(session_id, model_id, lease_s)
            except SessionBusy:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
            # Woken by a commit or release, or when the lease would run out on its own.
            wake = min(left, self.table.lease_left(session_id)) + 0.001
            async with changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), timeout=wake)

    async def commit(self, session_id: str, lease: str, blob: bytes, meta: dict[str, Any]) -> int:
        try:
            return self.table.commit(session_id, lease, blob, meta)
        finally:
            await self._notify()

    async def release(self, session_id: str, lease: str) -> None:
        self.table.release(session_id, lease)
        await self._notify()

    async def delete(self, session_id: str) -> None:
        self.table.delete(session_id)
        await self._notify()

    async def count(self) -> int:
        return len(self.table)

    async def _notify(self) -> None:
        changed = self._condition()
        async with changed:
            changed.notify_all()


def store_name(app_name: str) -> str:
    return f"memlab-sessions-{app_name}"


def session_store(name: str, limits: StoreLimits) -> ray.actor.ActorHandle:
    """The named store, created on first use. The first creator's limits hold until it ends."""
    return (
        ray.remote(SessionStore)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=0,
        )
        .remote(limits)
    )


def kill_store(name: str) -> bool:
    """End the named store and every session in it; False if there was none."""
    try:
        handle = ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True
