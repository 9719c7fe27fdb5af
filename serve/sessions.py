"""Hot copies of sessions in a model replica: decoded states kept between requests.

With session affinity (`serve.app` routes a session's requests to the replica that holds it), a
request skips the store's read and the decoding; the store still gets every commit before it is
acknowledged (write-through), so a replica's death loses nothing acknowledged. A copy proves itself
current by its version when it commits; a copy that lost (another replica committed first) is
replaced by the store's newer snapshot and the work is redone on it.

One update at a time per session in a replica: its lock is held for the update, and a request that
waits longer than `lock_wait_s` for it is refused with 409 and a retry hint. Bounded by bytes: past
`budget_bytes` the least recently used idle copies are dropped (their next request reads the store).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from serve.codec import SessionMemory
from serve.errors import SessionBusy, retry_after

Loader = Callable[[str], Awaitable[tuple[SessionMemory, int]]]


@dataclass
class HotSession:
    session_id: str
    memory: SessionMemory | None = None  # None: not loaded (or dropped), read the store
    version: int = -1
    nbytes: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def keep(self, memory: SessionMemory, version: int) -> None:
        self.memory, self.version = memory, version
        self.nbytes = memory.state.nbytes()

    def forget(self) -> None:
        self.memory, self.version, self.nbytes = None, -1, 0


class HotSessions:
    """The replica's copies, least recently used first."""

    def __init__(self, budget_bytes: int, lock_wait_s: float) -> None:
        self.budget_bytes = budget_bytes
        self.lock_wait_s = lock_wait_s
        self._copies: OrderedDict[str, HotSession] = OrderedDict()

    def __len__(self) -> int:
        return sum(copy.memory is not None for copy in self._copies.values())

    @property
    def nbytes(self) -> int:
        return sum(copy.nbytes for copy in self._copies.values())

    @asynccontextmanager
    async def locked(self, session_id: str, load: Loader) -> AsyncIterator[HotSession]:
        """The session's copy, loaded with `load` if this replica has none, under its lock."""
        copy = self._copies.setdefault(session_id, HotSession(session_id))
        self._copies.move_to_end(session_id)
        try:
            await asyncio.wait_for(copy.lock.acquire(), timeout=self.lock_wait_s)
        except TimeoutError:
            raise SessionBusy(
                "another update to this session is running; retry", retry_after(1)
            ) from None
        try:
            if copy.memory is None:
                copy.keep(*await load(session_id))
            yield copy
        finally:
            copy.lock.release()
            self._shed()

    async def loaded(self, session_id: str, load: Loader) -> HotSession:
        """The session's copy for reading: loaded under its lock if absent, then not held (a
        read works on the memory object it is given; an update replaces it, never mutates it)."""
        copy = self._copies.get(session_id)
        if copy is not None and copy.memory is not None:
            self._copies.move_to_end(session_id)
            return copy
        async with self.locked(session_id, load) as copy:
            return copy

    def drop(self, session_id: str) -> None:
        copy = self._copies.get(session_id)
        if copy is not None:
            copy.forget()

    def _shed(self) -> None:
        """Drop idle copies, oldest first, until the held bytes fit the budget."""
        total = self.nbytes
        for session_id in list(self._copies):
            if total <= self.budget_bytes:
                return
            copy = self._copies[session_id]
            if copy.lock.locked():
                continue
            total -= copy.nbytes
            del self._copies[session_id]
