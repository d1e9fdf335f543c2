"""Which daemon of a high-availability group acts: a PostgreSQL advisory lock and a generation.

The leader holds a session-level ``pg_try_advisory_lock`` on a connection of its own (TCP
keepalives on both ends, so a dead host's lock goes within about ``takeover_after``); on
taking it, one transaction raises the generation, the fencing token every write checks
(``pgstate``). Every ``takeover_after / 4`` (at most every second) the leader renews its
lease on that connection (``renewed_at``, only while the generation is still its own) and
steps down when it cannot; a standby tries the lock every ``takeover_after / 2``. A leader
whose lease is older than ``takeover_after`` while its session lives on (a paused process or
VM, whose kernel still answers keepalives) is evicted: the standby terminates that session
(``pg_terminate_backend``, allowed on sessions of one's own role) and takes the lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import structlog

from rollbackd import __version__
from rollbackd.errors import StateError
from rollbackd.pgstate import LOCK_KEY, PgState

log = structlog.get_logger("rollbackd.leader")

LEADER = "leader"
STANDBY = "standby"


class Leadership:
    """The election loop of one daemon; ``run()`` until cancelled."""

    def __init__(
        self,
        store: PgState,
        *,
        node: str,
        takeover_after: float,
        on_lead: Callable[[int], Awaitable[None]],
        on_standby: Callable[[str], Awaitable[None]],
    ) -> None:
        """``on_lead(generation)`` after a takeover; ``on_standby(why)`` after losing the lead."""
        self.store = store
        self.node = node
        self.takeover_after = takeover_after
        self._on_lead = on_lead
        self._on_standby = on_standby
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None
        self.generation = 0
        """The newest generation seen (ours while leading)."""
        self.peers: list[dict[str, Any]] = []
        self._led = False
        self.lock_pid: int | None = None
        """The server process of the lock connection (tests terminate it)."""

    @property
    def role(self) -> str:
        """``leader`` or ``standby``."""
        return LEADER if self.store.leading else STANDBY

    @property
    def leader_every(self) -> float:
        """How often the leader looks at its lock connection."""
        return min(1.0, self.takeover_after / 4)

    @property
    def standby_every(self) -> float:
        """How often a standby tries the lock."""
        return self.takeover_after / 2

    async def run(self) -> None:
        """Elect, watch the lock, record this peer; forever (cancel to stop)."""
        try:
            while True:
                if self._led:
                    await self._watch()
                else:
                    await self._try()
                await self._beat()
                await asyncio.sleep(self.leader_every if self.store.leading else self.standby_every)
        finally:
            await self._close()

    async def _watch(self) -> None:
        """The leader: renew the lease on the lock connection; if it cannot, step down at once."""
        conn = self._conn
        why = "lock connection closed"
        if not self.store.leading:  # a write found a newer generation
            why = "a newer generation leads"
        elif conn is not None:
            try:
                async with asyncio.timeout(self.takeover_after / 2):
                    cur = await conn.execute(
                        "UPDATE leadership SET renewed_at = EXTRACT(EPOCH FROM now()) "
                        "WHERE id = 1 AND generation = %s",
                        (self.store.generation,),
                    )
                if cur.rowcount == 1:
                    return
                why = "a newer generation leads"
            except (psycopg.Error, TimeoutError) as exc:
                why = f"lock connection lost: {str(exc).strip() or type(exc).__name__}"
        await self.step_down(why)

    async def step_down(self, why: str) -> None:
        """Stop acting now (writes are refused from here on), then tell the daemon."""
        if not self._led:
            return
        self._led = False
        self.store.lead(None)
        log.error("leadership_lost", node=self.node, generation=self.generation, reason=why)
        await self._close()
        await self._on_standby(why)

    async def _try(self) -> None:
        """A standby: take the lock if it is free; then raise the generation and lead."""
        try:
            conn = self._conn or await self._connect()
            async with asyncio.timeout(self.takeover_after):
                if not await self._lock(conn):
                    return
                async with conn.transaction():
                    cur = await conn.execute(
                        "UPDATE leadership SET generation = generation + 1, holder = %s, "
                        "since = %s, holder_pid = pg_backend_pid(), "
                        "renewed_at = EXTRACT(EPOCH FROM now()) WHERE id = 1 RETURNING generation",
                        (self.node, time.time()),
                    )
                    row = await cur.fetchone()
        except (psycopg.Error, TimeoutError) as exc:
            log.warning("leadership_try_failed", node=self.node, error=str(exc).strip())
            await self._close()
            return
        if row is None:  # the leadership row is gone: never act without a generation
            log.error("leadership_row_missing", node=self.node)
            await self._close()
            return
        self.generation = int(row[0])
        self.store.lead(self.generation)
        self._led = True
        log.warning("leadership_taken", node=self.node, generation=self.generation)
        try:
            await self._on_lead(self.generation)
        except StateError as exc:  # e.g. the store failing during the resume
            await self.step_down(f"takeover failed: {exc}")

    async def _lock(self, conn: psycopg.AsyncConnection[tuple[Any, ...]]) -> bool:
        """Try the lock; evict a holder whose lease ran out, then try again (up to 1 s)."""
        cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
        row = await cur.fetchone()
        if row is not None and row[0]:
            return True
        cur = await conn.execute(
            "SELECT l.holder, l.holder_pid, EXTRACT(EPOCH FROM now()) - l.renewed_at "
            "FROM leadership l JOIN pg_locks k ON k.pid = l.holder_pid "
            "AND k.locktype = 'advisory' AND k.granted AND k.classid = %s AND k.objid = %s "
            "WHERE l.id = 1",
            (LOCK_KEY >> 32, LOCK_KEY & 0xFFFFFFFF),
        )
        stale = await cur.fetchone()
        if stale is None or stale[2] is None or float(stale[2]) <= self.takeover_after:
            return False
        holder, pid, age = stale
        log.error("leader_evicted", node=self.node, leader=holder, lease_age=round(float(age), 2))
        await conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(20):  # the terminated session lets go of the lock as it exits
            await asyncio.sleep(0.05)
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            row = await cur.fetchone()
            if row is not None and row[0]:
                return True
        return False

    async def _connect(self) -> psycopg.AsyncConnection[tuple[Any, ...]]:
        """The lock connection: keepalives on both ends bound how long a dead peer holds it."""
        idle = max(1, int(self.takeover_after / 2))
        count = 2
        target = self.store.target
        options = (
            f"-c tcp_keepalives_idle={idle} -c tcp_keepalives_interval=1 "
            f"-c tcp_keepalives_count={count} "
            f"-c tcp_user_timeout={int(self.takeover_after * 1000)}"
        )
        conn = await psycopg.AsyncConnection.connect(
            target.url,
            autocommit=True,
            application_name=f"rollbackd-lock:{self.node}"[:63],
            keepalives=1,
            keepalives_idle=idle,
            keepalives_interval=1,
            keepalives_count=count,
            tcp_user_timeout=int(self.takeover_after * 1000),
            options=options,
            **target.kwargs,
        )
        self._conn = conn
        self.lock_pid = conn.info.backend_pid
        return conn

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def _beat(self) -> None:
        """Record this peer; read the generation and the peers for /status."""
        try:
            self.generation, self.peers = await self.store.beat(self.node, self.role, __version__)
        except StateError as exc:
            log.warning("peer_beat_failed", node=self.node, error=str(exc))
