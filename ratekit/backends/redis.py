"""The Redis backend: one account's usage shared by every process and pod that uses it.

Same contract as the memory backend (DESIGN.md, "Window semantics"), kept in
Lua scripts (``lua/*.lua``): an admission over every dimension is one EVALSHA,
a settle or refund another. Time is the Redis server's ``TIME``, so pods with
skewed clocks agree. All keys of an account share one hash tag (Redis Cluster),
expire by themselves once the account is idle, and hold O(slices) fields per rate.

Concurrency slots are leases that living holders renew; the slot of a process
killed mid-call comes back when its lease lapses (`lease_ttl_s`). Releases are
announced on pub/sub so that waiting pods retry at once.

redis-py's asyncio client ties this backend to asyncio (not trio).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import time
import zoneinfo
from collections.abc import Callable
from datetime import datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._clock import Clock
from .._errors import BackendUnavailableError, LimitsError
from .._limits import Limits, Rate
from ._base import (
    UNIT_POSITION,
    Demand,
    DimensionStatistics,
    Grant,
    Listeners,
    Refusal,
    take_kind,
)
from ._scripts import PAUSE, RENEW, RESERVE, SETTLE, STATS
from .memory import MemoryBackend, MemoryGrant

OnUnavailable = Literal["fail_closed", "fail_open", "local"]
_POLICIES: tuple[OnUnavailable, ...] = ("fail_closed", "fail_open", "local")
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)
# Waits before trying Redis again after it failed, growing to the last one.
_BACKOFF_S = (0.25, 0.5, 1.0, 2.0)
# How often the release listener looks up from an empty channel, and how long
# closing waits for the background tasks.
_LISTEN_POLL_S = 1.0
_CLOSE_WAIT_S = 3.0


class _Binding:
    """One `Limits` value as the scripts see it: its keys and its packed window specs."""

    __slots__ = (
        "concurrency",
        "key_ttl_ms",
        "keys",
        "limits",
        "names",
        "rates",
        "spec_until",
        "specs",
    )

    def __init__(self, limits: Limits, prefix: str) -> None:
        self.limits = limits
        self.rates: tuple[Rate, ...] = limits.all_rates
        self.names = [rate.name for rate in self.rates]
        self.concurrency = "" if limits.concurrency is None else str(limits.concurrency)
        windows = [_window_key(prefix, rate) for rate in self.rates]
        self.keys = [f"{prefix}:leases", *windows, f"{prefix}:waiting", f"{prefix}:cooldown"]
        longest_s = max((rate.period_s * (1 + 1 / rate.slices) for rate in self.rates), default=0.0)
        self.key_ttl_ms = math.ceil((longest_s + limits.margin_s) * 1000)
        self.specs = ""
        self.spec_until = -math.inf
        self.current_specs()

    def current_specs(self) -> str:
        """The window specs packed for the scripts (see parse_specs in _window.lua).

        Packed once; a calendar day's UTC offset is looked up again every hour.
        """
        if time.monotonic() < self.spec_until:
            return self.specs
        limits = self.limits
        parts = []
        for rate in self.rates:
            offset = _utc_offset_s(rate.calendar_tz) if rate.calendar_tz else "-"
            pacing = "1" if limits.pacing and rate.unit == "requests" else "0"
            fields = (
                repr(float(rate.limit)),
                repr(rate.period_s),
                repr(rate.period_s / rate.slices),
                repr(limits.margin_s),
                pacing,
                str(take_kind(rate, limits.token_counting)),
                str(UNIT_POSITION[rate.unit]),
                offset,
            )
            parts.append(" ".join(fields))
        self.specs = "|".join(parts)
        has_calendar = any(rate.calendar_tz for rate in self.rates)
        self.spec_until = time.monotonic() + 3600 if has_calendar else math.inf
        return self.specs


def _amounts(demand: Demand) -> str:
    return f"{demand[0]!r} {demand[1]!r} {demand[2]!r}"


def _window_key(prefix: str, rate: Rate) -> str:
    return f"{prefix}:w:{rate.unit}:{rate.period_s!r}:{rate.slices}:{rate.calendar_tz or ''}"


def _utc_offset_s(zone_name: str) -> str:
    zone = zoneinfo.ZoneInfo(zone_name)
    offset = datetime.now(zone).utcoffset()
    return repr(offset.total_seconds() if offset else 0.0)


class RedisGrant:
    """One admission through Redis: its lease, and what it took from each window."""

    __slots__ = ("binding", "demand", "indexes", "lease_id", "local", "settled")

    def __init__(
        self,
        binding: _Binding | None,
        demand: Demand,
        lease_id: str,
        indexes: list[str],
        local: MemoryGrant | None = None,
    ) -> None:
        self.binding = binding
        self.demand = demand
        self.lease_id = lease_id
        self.indexes = indexes
        # Admitted by the local fallback while Redis was down.
        self.local = local
        self.settled = False


class RedisBackend:
    """Keeps one account's usage in Redis, shared by every process that names it.

    `redis` is a ``redis://`` or ``rediss://`` URL (a password in it is never
    shown in an error, a log or a repr) or a ``redis.asyncio.Redis`` client.
    `namespace` names the account: processes with the same namespace share
    limits, others never touch each other's counts.

    `lease_ttl_s`: how long a concurrency slot outlives a holder that stops
    renewing (a killed process). `on_unavailable` says what to do while Redis
    cannot be reached: ``"fail_closed"`` raises `BackendUnavailableError`
    (default), ``"fail_open"`` admits everything, ``"local"`` admits within
    `local_share` of the limits kept in this process. Redis is tried again after
    a short backoff, and used as soon as it answers.

    `clock` replaces the server's TIME (tests with a `FakeClock`). One instance
    serves any number of limiters of one asyncio loop; close it with `aclose`.
    """

    def __init__(
        self,
        redis: str | Redis,
        *,
        namespace: str,
        lease_ttl_s: float = 10.0,
        on_unavailable: OnUnavailable = "fail_closed",
        local_share: float = 1.0,
        prefix: str = "ratekit",
        clock: Clock | None = None,
    ) -> None:
        if not namespace or any(c in namespace for c in "{}"):
            raise LimitsError(
                f"RedisBackend.namespace must be non-empty without braces, got {namespace!r}"
            )
        if on_unavailable not in _POLICIES:
            raise LimitsError(
                f"RedisBackend.on_unavailable must be one of {', '.join(_POLICIES)}, "
                f"got {on_unavailable!r}"
            )
        if not 0 < local_share <= 1:
            raise LimitsError(f"RedisBackend.local_share must be in (0, 1], got {local_share!r}")
        if not lease_ttl_s > 0:
            raise LimitsError(f"RedisBackend.lease_ttl_s must be positive, got {lease_ttl_s!r}")
        if isinstance(redis, str):
            self._where = _redacted(redis)
            self._client = Redis.from_url(redis, socket_connect_timeout=1.0, socket_timeout=2.0)
        else:
            self._where = _describe(redis)
            self._client = redis
        self.namespace = namespace
        self._prefix = f"{prefix}:{{{namespace}}}"
        self._channel = f"{self._prefix}:released"
        self._lease_ttl_s = float(lease_ttl_s)
        self._policy: OnUnavailable = on_unavailable
        self._local_share = local_share
        self._clock = clock
        self._lease_ids = itertools.count()
        self._instance = os.urandom(6).hex()
        self._binding: _Binding | None = None
        # Leases of calls in flight from this process, renewed in the background.
        self._live: dict[str, _Binding] = {}
        self._listeners = Listeners()
        self._tasks: set[asyncio.Task[None]] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._closing = False
        self._prefix_root = prefix
        self._owns_client = True
        self._children: list[RedisBackend] = []
        self._tier_callbacks: list[Callable[[str], None]] = []
        # While Redis is down: when to try again, how many failures in a row, and
        # the last error's type (its text could hold connection details).
        self._retry_at = 0.0
        self._last_error = ""
        self._failures = 0
        # Settles that could not reach Redis, sent again when it answers.
        self._pending: list[tuple[list[str], list[str]]] = []
        self._fallback = MemoryBackend()
        # A slot freed in the fallback must wake this backend's waiters too.
        self._fallback.subscribe(self._listeners.notify)
        self._fallback_limits: tuple[Limits, Limits] | None = None

    def __repr__(self) -> str:
        return f"RedisBackend({self._where}, namespace={self.namespace!r})"

    @property
    def client(self) -> Redis:
        return self._client

    def key_prefix(self) -> str:
        """The prefix (with the account's hash tag) of every key of this account."""
        return self._prefix

    # -- binding ------------------------------------------------------------------

    def _bind(self, limits: Limits) -> _Binding:
        binding = self._binding
        if binding is None or binding.limits is not limits:
            binding = self._binding = _Binding(limits, self._prefix)
        return binding

    def _key_ttl_ms(self, binding: _Binding) -> int:
        # Keys outlive the longest window and a lease, so live holds are never lost.
        return binding.key_ttl_ms + math.ceil(self._lease_ttl_s * 2000)

    def _now_arg(self) -> str:
        return "" if self._clock is None else repr(self._clock.now())

    # -- the Backend protocol ----------------------------------------------------------

    async def reserve(self, limits: Limits, demand: Demand) -> Grant | Refusal:
        binding = self._bind(limits)
        if not self._reachable():
            return self._reserve_unavailable(limits, demand, binding)
        lease_id = f"{self._instance}:{next(self._lease_ids)}"
        args = [
            self._now_arg(),
            binding.concurrency,
            lease_id,
            repr(self._lease_ttl_s),
            str(self._key_ttl_ms(binding)),
            binding.current_specs(),
            _amounts(demand),
        ]
        try:
            # Shielded: a reply that was granted must reach us, or the grant would leak.
            with anyio.CancelScope(shield=True):
                await self._flush_pending()
                reply = await RESERVE.run(self._client, binding.keys, args)
        except _UNREACHABLE as exc:
            self._mark_down(exc)
            return self._reserve_unavailable(limits, demand, binding)
        self._mark_up()
        if int(reply[0]) == 1:
            self._live[lease_id] = binding
            self._start(renew=True)
            return RedisGrant(binding, demand, lease_id, [_text(i) for i in reply[2:]])
        self._start(renew=False)
        dimension = int(reply[2])
        if dimension <= 0:
            name = "concurrency" if dimension == 0 else "cooldown"
        else:
            name = binding.names[dimension - 1]
        return Refusal(float(reply[1]), name)

    async def settle(self, limits: Limits, grant: Grant, actual: Demand | None) -> None:
        assert isinstance(grant, RedisGrant), "a grant of another backend"
        if grant.settled:
            return
        grant.settled = True
        if grant.local is not None:
            self._fallback.settle_now(grant.local, actual, self._fallback.clock.now())
            return
        binding = grant.binding
        if binding is None:  # admitted while failing open: nothing was counted
            return
        self._live.pop(grant.lease_id, None)
        real = actual if actual is not None else grant.demand
        args = [
            self._now_arg(),
            grant.lease_id,
            self._channel,
            "1" if actual is None else "0",
            binding.current_specs(),
            _amounts(grant.demand),
            _amounts(real),
            " ".join(grant.indexes),
        ]
        try:
            with anyio.CancelScope(shield=True):
                await SETTLE.run(self._client, binding.keys, args)
        except _UNREACHABLE as exc:
            self._mark_down(exc)
            # Sent again when Redis answers; until then the lease lapses on its own.
            args[0] = ""
            self._pending.append((binding.keys, args))

    async def statistics(self, limits: Limits) -> tuple[DimensionStatistics, ...]:
        binding = self._bind(limits)
        args = [self._now_arg(), binding.current_specs()]
        try:
            reply = await STATS.run(self._client, binding.keys, args)
        except _UNREACHABLE as exc:
            self._mark_down(exc)
            raise self._unavailable_error() from None
        in_flight = int(reply[0])
        stats = []
        if limits.concurrency is not None:
            stats.append(
                DimensionStatistics(
                    "concurrency", "slots", limits.concurrency, in_flight, in_flight
                )
            )
        for number, rate in enumerate(binding.rates):
            used, held = float(reply[1 + 2 * number]), float(reply[2 + 2 * number])
            stats.append(DimensionStatistics(rate.name, rate.unit, rate.limit, used, held))
        return tuple(stats)

    async def pause(self, seconds: float) -> float:
        key = f"{self._prefix}:cooldown"
        try:
            reply = await PAUSE.run(self._client, [key], [self._now_arg(), repr(float(seconds))])
        except _UNREACHABLE as exc:
            self._mark_down(exc)
            return self._fallback.pause_now(seconds, self._fallback.clock.now())
        return float(reply)

    def child(self, name: str) -> RedisBackend:
        """A backend for limits of their own (a model's) within this account.

        Same server, client and policy; namespace ``<namespace>.<name>``. Closed
        with this one.
        """
        backend = RedisBackend(
            self._client,
            namespace=f"{self.namespace}.{name}",
            lease_ttl_s=self._lease_ttl_s,
            on_unavailable=self._policy,
            local_share=self._local_share,
            prefix=self._prefix_root,
            clock=self._clock,
        )
        backend._owns_client = False
        backend._where = self._where
        self._children.append(backend)
        return backend

    async def publish_tier(self, tier: str) -> None:
        """Tell every pod of the account that it is now on `tier` (and remember it)."""
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.set(f"{self._prefix}:tier", tier)
            pipe.publish(self._channel, f"tier:{tier}")
            await pipe.execute()

    async def shared_tier(self) -> str | None:
        """The tier the account's pods last agreed on, if any was published."""
        value = await self._client.get(f"{self._prefix}:tier")
        return None if value is None else _text(value)

    def on_tier(self, callback: Callable[[str], None]) -> None:
        """Call `callback(tier)` when another pod publishes a tier change."""
        self._tier_callbacks.append(callback)

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        return self._listeners.add(listener)

    # -- background: lease renewal and release notices ----------------------------------

    def _start(self, *, renew: bool) -> None:
        if renew and (self._renewer is None or self._renewer.done()):
            self._renewer = self._spawn(self._renew_loop())
        wanted = self._listeners or self._tier_callbacks
        if wanted and (self._subscriber is None or self._subscriber.done()):
            self._subscriber = self._spawn(self._listen_loop())

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _renew_loop(self) -> None:
        while self._live:
            await asyncio.sleep(self._lease_ttl_s / 3)
            by_binding: dict[int, tuple[_Binding, list[str]]] = {}
            for lease_id, binding in list(self._live.items()):
                by_binding.setdefault(id(binding), (binding, []))[1].append(lease_id)
            for binding, lease_ids in by_binding.values():
                args = [
                    self._now_arg(),
                    repr(self._lease_ttl_s),
                    str(self._key_ttl_ms(binding)),
                    *lease_ids,
                ]
                try:
                    await RENEW.run(self._client, binding.keys, args)
                except _UNREACHABLE as exc:
                    self._mark_down(exc)

    async def _listen_loop(self) -> None:
        while (self._listeners or self._tier_callbacks) and not self._closing:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                while not self._closing:
                    # A bounded wait, so that closing never depends on a message.
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_LISTEN_POLL_S
                    )
                    if message is not None and message.get("type") == "message":
                        self._dispatch(_text(message.get("data", b"")))
            except _UNREACHABLE:
                await asyncio.sleep(_BACKOFF_S[-1])
            finally:
                with anyio.move_on_after(1.0, shield=True):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _dispatch(self, data: str) -> None:
        if data.startswith("tier:"):
            for callback in list(self._tier_callbacks):
                callback(data[len("tier:") :])
        else:
            self._listeners.notify()

    async def aclose(self) -> None:
        """Stop the background tasks (within a few seconds at most) and close the client."""
        self._closing = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_CLOSE_WAIT_S)
        for child in self._children:
            await child.aclose()
        if self._owns_client:
            await self._client.aclose()

    # -- Redis unreachable ----------------------------------------------------------------

    def _reachable(self) -> bool:
        return self._failures == 0 or time.monotonic() >= self._retry_at

    def _mark_down(self, exc: BaseException) -> None:
        self._last_error = type(exc).__name__
        if self._failures and time.monotonic() < self._retry_at:
            return  # another call of the same outage: one failure per retry
        delay = _BACKOFF_S[min(self._failures, len(_BACKOFF_S) - 1)]
        self._failures += 1
        self._retry_at = time.monotonic() + delay

    def _mark_up(self) -> None:
        self._failures = 0

    async def _flush_pending(self) -> None:
        while self._pending:
            keys, args = self._pending[0]
            await SETTLE.run(self._client, keys, args)
            self._pending.pop(0)

    def _unavailable_error(self) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"redis at {self._where} is unreachable ({self._last_error}); "
            f"namespace {self.namespace!r}, policy {self._policy}"
        )

    def _reserve_unavailable(
        self, limits: Limits, demand: Demand, binding: _Binding
    ) -> Grant | Refusal:
        if self._policy == "fail_closed":
            raise self._unavailable_error()
        if self._policy == "fail_open":
            return RedisGrant(None, demand, "", [])
        local_limits = self._local_limits(limits)
        outcome = self._fallback.reserve_now(local_limits, demand, self._fallback.clock.now())
        if isinstance(outcome, Refusal):
            # Redis may be back before the local hint: retry no later than the backoff.
            wait_s = min(outcome.wait_s, max(self._retry_at - time.monotonic(), 0.0))
            return Refusal(wait_s, outcome.dimension)
        return RedisGrant(None, demand, "", [], local=outcome)

    def _local_limits(self, limits: Limits) -> Limits:
        cached = self._fallback_limits
        if cached is not None and cached[0] is limits:
            return cached[1]
        share = self._local_share
        concurrency = limits.concurrency
        scaled = Limits(
            concurrency=None if concurrency is None else max(1, math.floor(concurrency * share)),
            rates=tuple(
                Rate(
                    rate.limit * share,
                    rate.period_s,
                    rate.unit,
                    name=rate.name,
                    slices=rate.slices,
                    calendar_tz=rate.calendar_tz,
                )
                for rate in limits.all_rates
            ),
            margin_s=limits.margin_s,
            pacing=limits.pacing,
            token_counting=limits.token_counting,
        )
        self._fallback_limits = (limits, scaled)
        return scaled


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _redacted(url: str) -> str:
    """`url` without its user name or password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    path = parts.path if parts.path not in ("", "/") else ""
    return f"{parts.scheme}://{host}{port}{path}"


def _describe(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"
