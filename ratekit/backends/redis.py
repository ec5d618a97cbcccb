"""The Redis backend: one account's usage shared by every process and pod that uses it.

Same contract as the memory backend (DESIGN.md, "Window semantics"), kept in
Lua scripts (``lua/*.lua``): an admission over every dimension is one EVALSHA,
a settle or refund another; an admission of requests alone (no slot, nothing held
or corrected) takes no lease and is never settled. Settles that a sender takes
together with a reserve of the same account run with it as one script (a step:
the state read, the clock read and the state written once for both), as a task
that calls in a loop has it: one script per call. An account is one key under its
hash tag (Redis Cluster): a state hash (running totals, O(slices) fields per rate,
and a field per lease of a call in flight). Each script reads the fields it needs
in one HMGET and writes in one HSET and one HDEL, so its commands do not grow with
traffic: a 4-dimension admission runs FCALL, TIME, HMGET and HSET on the server,
its settle FCALL, TIME, HMGET, HSET and HDEL, the two as one step FCALL, TIME,
HMGET, HSET and HDEL. The key expires by itself once the account is idle. Key
names carry the layout's version (`LAYOUT`): pods of versions that lay keys out
differently never touch each other's counts.

A tenant with limits of its own (`ratekit.Tenants`) is one more key of the same
shape under the account's hash tag (``<prefix>:{<namespace>}:v<LAYOUT>:ts:<tenant>``),
taken and ended in the same EVALSHA as the account's; it expires once the tenant is
idle.
A call without a tenant sends none of it.

Time is the Redis server's ``TIME``, read inside each script, so every pod uses
one clock and no client's skew matters. Per account it never goes back: a step
back of the server's clock is absorbed (the account's clock resumes where it was
and runs on, so pacing and windows neither stall nor restart). A step forward
cannot be told from idle time: it is taken as it comes, and windows expire that
much early (a burst the provider may answer with 429s); only an NTP-disciplined
server clock avoids it. Calendar days read the same ``TIME`` (wall time) with the
zone's UTC offset for the instant at hand, daylight saving included; a day already
reached is never left for an earlier one. The limiter's own instant is used only
with ``server_time=False`` (one process, tests with a fake clock).

Concurrency slots are leases that living holders renew; the slot of a process
killed mid-call, or of an admission dropped without a settle, comes back when its
lease lapses (`lease_ttl_s`). Releases are announced on pub/sub so that waiting
pods retry at once.

Commands are sent by the backend's own tasks, over at most `connections`
connections at once: callers beyond wait their turn, and a burst of them shares
round trips (pipelined); the reserves of one account that wait together run as one
script, which admits them in the order they came. Each round trip is bounded by
`command_timeout_s`, and the caller's await is cancellable whatever the client: a
grant that arrives after its caller left is handed back by the backend itself.
Only socket-level failures (refused, reset, timed out) count as an outage; a busy
connection pool never does.

redis-py's asyncio client ties this backend to asyncio (not trio) and to the
event loop it is first used in.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import inspect
import itertools
import logging
import math
import os
import time
import weakref
import zoneinfo
from collections import OrderedDict, deque
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Mapping,
    Sequence,
)
from datetime import UTC, datetime
from functools import partial
from types import TracebackType
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    MaxConnectionsError,
    NoPermissionError,
    NoScriptError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._clock import Instant
from .._errors import (
    BackendUnavailableError,
    InvalidArgumentError,
    LimitsError,
    WrongEventLoopError,
)
from .._limits import Limits, Rate
from ._base import (
    OUT,
    RECORDED,
    TENANT_PREFIX,
    UNAVAILABLE,
    UNIT_POSITION,
    Demand,
    DimensionStatistics,
    Grant,
    Listeners,
    Refusal,
    TenantShare,
    take_kind,
    takes_no_slot,
)
from ._scripts import (
    ESTIMATES,
    LIBRARY,
    PAUSE,
    RENEW,
    RESERVE,
    SCRIPTS,
    SENT,
    SETTLE,
    STATS,
    STEP,
    Script,
)
from .memory import MemoryBackend, MemoryGrant

OnUnavailable = Literal["fail_closed", "fail_open", "local"]
_POLICIES: tuple[OnUnavailable, ...] = ("fail_closed", "fail_open", "local")
_T = TypeVar("_T")

_log = logging.getLogger("ratekit.redis")

# Waits before trying Redis again after it failed, growing to the last one.
_BACKOFF_S = (0.25, 0.5, 1.0, 2.0)
# How often the release listener looks up from an empty channel, and how long
# closing waits for settles still on their way.
_LISTEN_POLL_S = 1.0
# How long a pod's learned token-estimate factor counts for the fleet after it last
# sent it (see share_estimates).
_ESTIMATES_FRESH_S = 600.0
_CLOSE_WAIT_S = 3.0
# Connections sending commands at once when the client's pool allows more (or is
# unbounded), and how many commands one round trip carries at most: a burst of
# thousands of callers shares a few connections, far below a process's file
# descriptors, and keeps one server busy.
_CONNECTIONS = 8
_BATCH = 128
# Connections of the pool left to the release listeners and the user's own calls.
_POOL_SPARE = 4
# Commands of one batch a sender has on their way at once on a cluster (each takes a
# connection of its node's pool): all senders together stay within a node's 100.
_CLUSTER_FANOUT = 8
# The reply of a cluster command refused a connection by a busy pool: not sent.
_POOL_BUSY = object()
# How many command timeouts a round trip may last while the server still answers a
# PING (it is busy, not down) before it is given up as lost.
_SLOW_LIMIT = 5
# A pool exhausted by someone else's use of the client: wait and try again.
_POOL_RETRY_S = (0.002, 0.05)
# How long a sender keeps its connection once it has nothing to send: a caller that
# comes back within it skips the pool's lock and checks (see `_Held`).
_LINGER_S = 0.5
# Round trips that load what runs a script (the library, or the scripts after turning
# to EVALSHA) before its command is given its error reply.
_LOAD_TRIES = 2
# Settles (and a tier) kept while Redis is down, sent when it answers again.
_MAX_PENDING = 10_000
# Bounds of the arguments (seconds), so that no sum or ttl overflows on the server.
_LEASE_TTL_RANGE_S = (0.01, 1e6)
_COMMAND_TIMEOUT_RANGE_S = (0.001, 3600.0)
_OUTAGE_WAIT_RANGE_S = (0.0, 1e6)
# The shortest wait of a caller kept waiting through an outage, before it asks again.
_OUTAGE_RETRY_S = 0.01
# A failure this long after the last one (s), with nothing sent in between, begins a
# new outage (see `_Link.stale`).
_NEW_OUTAGE_AFTER_S = 30.0
# How often a backend looks for the keys of an earlier ratekit version (s).
_LEGACY_LOOK_S = 60.0
_MAX_PAUSE_S = 1e7
# A reserve's dimension while the account is taken out (see pause.lua).
_OUT_REPLIES = (b"out", "out")
# How far from the client's wall clock a calendar day's transition is looked for, and
# how long one lookup serves (the server's clock may differ from the client's).
_TRANSITION_SEARCH_S = 2 * 86400.0
_SPECS_VALID_S = 86400.0
# Credits (see `_Credit`): how long one lasts at most (s), the most requests one draws,
# and the largest share of any window's limit it may draw.
CREDIT_S = 1.0
_CREDIT_MAX = 256
_CREDIT_SHARE = 1 / 16
# The lease id of a credit's demand in a reserve (see reserve.lua).
_CREDIT_LEASE = "+"
# What pause.lua publishes on the account's channel.
_PAUSE_NOTICE = "pause"


# -- arguments --------------------------------------------------------------------------


def _check_number(name: str, value: object, low: float, high: float) -> float:
    """`value` as a float in [low, high], or a typed error naming `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgumentError(f"RedisBackend.{name} must be a number, got {value!r}")
    number = float(value)
    if not low <= number <= high:
        raise LimitsError(f"RedisBackend.{name} must be in [{low:g}, {high:g}] s, got {value!r}")
    return number


def _check_name(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidArgumentError(f"RedisBackend.{name} must be a str, got {value!r}")
    if not value or any(c in value for c in "{}"):
        raise LimitsError(f"RedisBackend.{name} must be non-empty without braces, got {value!r}")
    return value


# -- failures ---------------------------------------------------------------------------


class _Down(Exception):
    """Redis is known to be down (within the backoff): the command was not sent."""


# A client of one server, or of a Redis Cluster (an account's keys share one hash tag,
# so each script runs on the one node that holds them).
Client = Redis | RedisCluster


def _is_outage(exc: BaseException) -> bool:
    """Whether `exc` says the server cannot be reached: a socket-level failure or a
    command that timed out. A busy connection pool is not an outage."""
    if isinstance(exc, MaxConnectionsError):
        return False
    return isinstance(exc, _Down | RedisConnectionError | RedisTimeoutError | OSError)


def _function_not_found(reply: Any) -> bool:
    """Whether `reply` to an FCALL says its function is not loaded (a restart, a flush,
    or the library's first use)."""
    return isinstance(reply, ResponseError) and str(reply).startswith("Function not found")


def _no_functions(reply: Any) -> bool:
    """Whether `reply` to an FCALL says the server has no functions: a command it does
    not know (before 7.0, or renamed away) or that the user may not run."""
    if isinstance(reply, NoPermissionError):
        return True
    return isinstance(reply, ResponseError) and str(reply).lower().startswith("unknown command")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _raise_if_cancelled(task: asyncio.Task[Any] | None = None) -> None:
    """Raise CancelledError if the current task (`task`, when known) was asked to stop.

    A loop in the background checks after each await into redis-py: on Python 3.11
    a cancel that arrives while a call completes can be swallowed inside it, and a
    loop that went on would never end.
    """
    if task is None:
        task = asyncio.current_task()  # a Python function on 3.11, ~0.4 µs
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


# -- packing for the scripts ------------------------------------------------------------


def _amounts(demand: Demand) -> str:
    return f"{demand[0]!r} {demand[1]!r} {demand[2]!r}"


def _window_id(rate: Rate) -> str:
    """What names `rate`'s window among the state's fields: its unit, period, slices and
    zone, not its limit (changed limits keep counting what was used)."""
    return f"{rate.unit}:{rate.period_s!r}:{rate.slices}:{rate.calendar_tz or ''}"


_UNIT_LETTER = {"requests": "r", "tokens": "t", "money": "m"}


def _tenant_window_id(rate: Rate) -> str:
    """`_window_id` made short, for a tenant's state: many tenants, few bytes each."""
    zone = f"/{rate.calendar_tz}" if rate.calendar_tz else ""
    return f"{_UNIT_LETTER[rate.unit]}{rate.period_s!r}/{rate.slices}{zone}"


# The version of an account's key layout, part of every key's name, so that pods of two
# ratekit versions whose layouts differ never read or write each other's keys (one
# would miscount what the other wrote: slots in flight, tokens held). 1 kept leases
# in a sorted set of their own, 2 keeps them as fields of the state hash; neither
# named its keys with it (`_legacy_state_key`).
LAYOUT = 2


def _legacy_state_key(root: str, namespace: str) -> str:
    """The state key of layouts 1 and 2 before keys were named with their layout."""
    return f"{root}:{{{namespace}}}:state"


def _account_keys(prefix: str) -> list[str]:
    """An account's keys, as every script takes them: its state (its leases are fields
    of it)."""
    return [f"{prefix}:state"]


def _tenant_keys(prefix: str, tenant: str) -> tuple[str]:
    """A tenant's keys under its account's `prefix`: its state (its leases with it)."""
    return (f"{prefix}:ts:{tenant}",)


# The lease id of an admission that takes none (see `_Binding.leaseless`).
NO_LEASE = "-"


def _utc_offset_s(zone: zoneinfo.ZoneInfo, wall: float) -> float:
    offset = datetime.fromtimestamp(wall, UTC).astimezone(zone).utcoffset()
    return offset.total_seconds() if offset else 0.0


def zone_transition(zone_name: str, wall: float) -> tuple[float, float, float]:
    """The zone's UTC offsets (s) before and after its transition nearest `wall`
    (Unix s), and the transition's instant: ``(before, switch_at, after)``.

    Looked for within two days of `wall`; with none there, ``(offset, 0, offset)``.
    The scripts pick the offset of their own instant, so a calendar day is right on
    both sides of a daylight-saving change, on a server clock within a day of ours.
    """
    zone = zoneinfo.ZoneInfo(zone_name)
    low, high = math.floor(wall - _TRANSITION_SEARCH_S), math.ceil(wall + _TRANSITION_SEARCH_S)
    before, after = _utc_offset_s(zone, low), _utc_offset_s(zone, high)
    if before == after:
        return before, 0.0, after
    # The first whole second on the new offset (transitions fall on whole seconds).
    while high - low > 1:
        middle = (low + high) // 2
        if _utc_offset_s(zone, middle) == before:
            low = middle
        else:
            high = middle
    return before, float(high), after


def _credit_cap(limits: Limits) -> int:
    """The most requests a credit draws under `limits`, whose admissions take no lease:
    0 (none) with pacing (a credit would admit a burst) or a calendar day (its day may
    end within a slice), else a small share of the smallest limit."""
    rates = limits.all_rates
    if not rates or limits.pacing or any(rate.calendar_tz for rate in rates):
        return 0
    return min(_CREDIT_MAX, math.floor(min(rate.limit for rate in rates) * _CREDIT_SHARE))


class _Binding:
    """One `Limits` value as the scripts see it: its keys and its packed window specs.

    A tenant's binding has no keys of its own (each tenant has its own, see
    `_TenantPart`) and names its windows with `_tenant_window_id`.
    """

    __slots__ = (
        "calendar",
        "concurrency",
        "credit_cap",
        "fields",
        "fields_from",
        "fields_until",
        "key_ttl_ms",
        "key_ttl_text",
        "keys",
        "leaseless",
        "limits",
        "names",
        "rates",
        "specs_text",
        "window_id",
        "windows",
    )

    def __init__(
        self,
        limits: Limits,
        keys: list[str],
        lease_ttl_s: float,
        window_id: Callable[[Rate], str] = _window_id,
    ) -> None:
        self.limits = limits
        self.rates: tuple[Rate, ...] = limits.all_rates
        self.names = [rate.name for rate in self.rates]
        self.concurrency = "" if limits.concurrency is None else str(limits.concurrency)
        self.window_id = window_id
        self.windows = [window_id(rate) for rate in self.rates]
        self.keys = keys
        # Whether an admission can go without a lease: no slot to free, nothing
        # held, nothing its settle could change.
        self.leaseless = takes_no_slot(limits)
        # The most requests a credit under these limits draws (0: none, see `_Credit`).
        self.credit_cap = _credit_cap(limits) if self.leaseless else 0
        # Keys outlive the longest window (a 25 h calendar day) and two leases, so
        # that live holds and counts are never lost.
        longest_s = max(
            (
                90_000.0 if rate.calendar_tz else rate.period_s * (1 + 1 / rate.slices)
                for rate in self.rates
            ),
            default=0.0,
        )
        self.key_ttl_ms = math.ceil((longest_s + limits.margin_s) * 1000) + math.ceil(
            lease_ttl_s * 2000
        )
        # The scripts' key ttl argument, and whether a spec depends on the wall clock
        # (a calendar day's zone): both fixed for the binding's life.
        self.key_ttl_text = str(self.key_ttl_ms)
        self.calendar = any(rate.calendar_tz for rate in self.rates)
        # Each window's spec fields, packed, and the span of wall-clock instants
        # they serve (a calendar day's zone transition is looked up near one).
        self.fields: list[list[str]] = []
        self.specs_text = ""
        self.fields_from = math.inf
        self.fields_until = -math.inf

    def _fields(self, wall: float) -> list[list[str]]:
        """Each window's spec: id, limit, period, slice, margin, pacing, take, position, zone."""
        if self.fields_from <= wall <= self.fields_until:
            return self.fields
        limits = self.limits
        self.fields = []
        for rate in self.rates:
            if rate.calendar_tz:
                before, switch_at, after = zone_transition(rate.calendar_tz, wall)
                zone = f"{before!r} {switch_at!r} {after!r}"
            else:
                zone = "-"
            self.fields.append(
                [
                    self.window_id(rate),
                    repr(float(rate.limit)),
                    repr(rate.period_s),
                    repr(rate.period_s / rate.slices),
                    repr(limits.margin_s),
                    "1" if limits.pacing and rate.unit == "requests" else "0",
                    str(take_kind(rate, limits.token_counting)),
                    str(UNIT_POSITION[rate.unit]),
                    zone,
                ]
            )
        self.specs_text = "|".join(" ".join(fields) for fields in self.fields)
        if any(rate.calendar_tz for rate in self.rates) and math.isfinite(wall):
            self.fields_from, self.fields_until = wall - _SPECS_VALID_S, wall + _SPECS_VALID_S
        else:
            self.fields_from, self.fields_until = -math.inf, math.inf
        return self.fields

    def specs(self, wall: float, current: _Binding | None = None) -> str:
        """The window specs packed for the scripts (see parse_specs in _window.lua).

        With `current` (the limits in force at a settle, `self` those of the
        admission): each window of the admission is settled under the numbers in
        force now (limit, margin, pacing), as the memory backend's windows are, and
        taken back the way it was taken.
        """
        mine = self._fields(wall)
        if current is None or current is self:
            return self.specs_text
        now_in_force = dict(zip(current.windows, current._fields(wall), strict=True))
        packed = []
        for key, fields in zip(self.windows, mine, strict=True):
            theirs = now_in_force.get(key)
            if theirs is not None:
                fields = [*theirs[:6], fields[6], fields[7], *theirs[8:]]
            packed.append(" ".join(fields))
        return "|".join(packed)

    def tenant_args(self, wall: float) -> list[str]:
        """The four arguments of a tenant under these limits (see parse_tenants in
        _window.lua): key ttl, cap, whether its calls take a lease of their own, specs."""
        return [
            str(self.key_ttl_ms),
            self.concurrency,
            "0" if self.leaseless else "1",
            self.specs(wall),
        ]


class _TenantPart:
    """The tenant of one admission: who, under which limits, and what it took from
    the tenant's own windows (their slice indexes, as the scripts wrote them)."""

    __slots__ = ("binding", "indexes", "keys", "name")

    def __init__(self, name: str, binding: _Binding, keys: tuple[str]) -> None:
        self.name = name
        self.binding = binding
        self.keys = keys
        self.indexes: list[str] = []

    def admitted(self, indexes: list[str]) -> _TenantPart:
        """This tenant's part of one admission that took `indexes`."""
        part = _TenantPart(self.name, self.binding, self.keys)
        part.indexes = indexes
        return part


class RedisGrant:
    """One admission through Redis: its lease, and what it took from each window.

    The backend keeps only a weak reference: a grant its holder dropped is no
    longer renewed, so its slot comes back when its lease lapses.
    """

    __slots__ = (
        "__weakref__",
        "admitted",
        "binding",
        "credit",
        "demand",
        "indexes",
        "lease_id",
        "local",
        "sent",
        "settled",
        "tenant",
    )

    def __init__(
        self,
        binding: _Binding | None,
        demand: Demand,
        lease_id: str,
        indexes: list[str],
        local: MemoryGrant | None = None,
        tenant: _TenantPart | None = None,
    ) -> None:
        # None: admitted while Redis was down (failing open, or by the local fallback).
        self.binding = binding
        self.demand = demand
        self.lease_id = lease_id
        # The slice (or day) of the admission per window, as the scripts wrote it.
        self.indexes = indexes
        # Admitted by the local fallback while Redis was down.
        self.local = local
        # Its tenant, when the tenant has limits of its own (taken in the same script).
        self.tenant = tenant
        # Settled, refunded or abandoned: only the first one counts.
        self.settled = False
        # Whether its request was said to leave (`RedisBackend.restamp` done): what it
        # recorded counts from then. One never said to counts from its end.
        self.sent = False
        # (the account's clock, this process's monotonic clock) at the admission.
        self.admitted = (math.nan, math.nan)
        # The credit it was admitted from (see `_Credit`), without a round trip.
        self.credit: _Credit | None = None


class _Credit:
    """Requests this process drew from the account's windows ahead of its own next calls
    (a "credit"), to admit them without a round trip while it lasts.

    A credit is drawn in the round trip of an admission that goes to Redis anyway, as
    one more demand of that reserve (lease id ``"+"``, see reserve.lua), and recorded
    there like any admission: in the slice of its draw. It lasts until that slice ends
    (on the account's clock, reckoned from before the draw was sent, so never past it)
    or `CREDIT_S`, whichever is first: an admission from it is then in the very slice
    it would have been recorded in by a reserve of its own, and counts as long. What is
    left when it ends is refunded (a refund of an admission without a lease). So the
    account never counts less than was admitted, a process that dies leaves at most
    its credit counted for one window, and another process is refused at most by
    another's unused credit until it ends (a refund wakes its waiters).

    The script skips a credit while anybody waits, while the account is paused, and
    unless it fits twice over; only admissions without a lease (requests counted at
    admission, no cap: `_Binding.leaseless`), without pacing, calendar days or tenant
    limits draw one.
    """

    __slots__ = ("admitted", "binding", "drawn", "handle", "indexes", "left", "until", "used")

    def __init__(
        self,
        binding: _Binding,
        indexes: list[str],
        drawn: float,
        until: float,
        admitted: tuple[float, float],
    ) -> None:
        self.binding = binding
        # The slice per window it was recorded in, as the script wrote it.
        self.indexes = indexes
        # Requests drawn, and left to admit.
        self.drawn = drawn
        self.left = drawn
        # Requests admitted from it (refunds given back taken off).
        self.used = 0.0
        # Until when (the limiters' monotonic clock) admissions may come from it.
        self.until = until
        # (the account's clock, this process's) at the draw, as a grant's `admitted`.
        self.admitted = admitted
        # The timer that ends it at `until`.
        self.handle: asyncio.TimerHandle | None = None


class _Command:
    """One command on its way to Redis: what it sends, where its reply goes."""

    __slots__ = ("abortable", "args", "future", "orphan", "script", "sending")

    def __init__(
        self,
        args: tuple[str, ...],
        script: Script | None,
        future: asyncio.Future[Any],
        *,
        abortable: bool,
        orphan: Callable[[asyncio.Future[Any]], None],
    ) -> None:
        self.args = args
        # The script an EVALSHA runs, loaded again if the server answers NOSCRIPT.
        self.script = script
        # The caller's: its reply (or error). Cancelled with its caller.
        self.future = future
        # Dropped, if its caller left before it was sent (nothing else depends on it).
        self.abortable = abortable
        # Where the reply goes when its caller left after it was sent: a done future.
        self.orphan = orphan
        # True from the moment the command may have reached the server.
        self.sending = False

    def wanted(self) -> bool:
        """Whether it is still to be sent: its caller waits, or it must go anyway."""
        return not (self.abortable and self.future.done())

    def take(self) -> bool:
        """A sender takes it: False if it is dropped (its caller left and it need not go),
        else it may reach the server from now on."""
        if not self.wanted():
            return False
        self.sending = True
        return True

    def untake(self) -> None:
        """It was not sent after all: its caller may still leave and drop it."""
        self.sending = False

    def deliver(self, reply: Any) -> None:
        """Hand the reply (an exception for an error) to the caller, or to the orphan
        handler when the caller left."""
        future = self.future
        if not future.done():
            if isinstance(reply, BaseException):
                future.set_exception(reply)
            else:
                future.set_result(reply)
            return
        if future.cancelled() and self.sending:
            resolved = future.get_loop().create_future()
            if isinstance(reply, BaseException):
                resolved.set_exception(reply)
            else:
                resolved.set_result(reply)
            self.orphan(resolved)


class _Reserves:
    """The reserves of one account that wait for a sender together, under the same
    keys, window specs, cap, ttls and clock argument: sent as one run of the reserve
    script, which admits their demands in the order they came until one does not fit
    (reserve.lua), its reply split so that each caller hears what it would have heard
    alone (`deliver`).

    It takes more callers until a sender takes it (a burst shares one run without
    waiting for anything); a caller that left before then drops out, and nothing is
    reserved for it. Each caller is a `_Command` of its own, so a grant whose caller
    left after the run was sent goes to that caller's orphan handler, as for a reserve
    sent alone.
    """

    __slots__ = (
        "args",
        "count",
        "groups",
        "key",
        "keys",
        "members",
        "sending",
        "template",
        "windows",
    )

    # What the sender reads of a command: the script, loaded again on NOSCRIPT.
    script = RESERVE

    def __init__(
        self,
        keys: list[str],
        template: list[str],
        windows: int,
        key: tuple[str, ...],
        groups: dict[tuple[str, ...], _Reserves],
    ) -> None:
        self.keys = keys
        # The arguments of the first caller (see reserve.lua): every caller's are the same
        # but for the lease ids (ARGV[4]) and the demands (ARGV[7]).
        self.template = template
        # The slice indexes in the reply per demand admitted: one per window.
        self.windows = windows
        # Its place among the link's reserves still open to more callers.
        self.key = key
        self.groups = groups
        # Each caller, with its lease ids and demands as packed, and how many demands.
        self.members: list[tuple[_Command, str, str, int]] = []
        self.count = 0
        # The EVALSHA, built from the callers left when a sender takes it.
        self.args: tuple[str, ...] = ()
        self.sending = False

    def add(self, command: _Command, lease_ids: str, demands: str, count: int) -> None:
        self.members.append((command, lease_ids, demands, count))
        self.count += count

    def take(self) -> bool:
        """A sender takes it: it is closed to more callers, those who left drop out, and
        the one EVALSHA of those left is built (False: nobody is left)."""
        if self.groups.get(self.key) is self:
            del self.groups[self.key]
        members = self.members = [member for member in self.members if member[0].wanted()]
        if not members:
            return False
        for member in members:
            member[0].sending = True
        self.sending = True
        template = self.template
        args = [
            *template[:3],
            " ".join([member[1] for member in members]),
            *template[4:6],
            "|".join([member[2] for member in members]),
        ]
        self.args = RESERVE.evalsha(self.keys, args)
        return True

    def untake(self) -> None:
        self.sending = False
        for member in self.members:
            member[0].untake()

    def deliver(self, reply: Any) -> None:
        """Each caller's part of the reply, as reserve.lua answers one caller alone:
        ``{k, now, slice indexes of its k admitted, [wait, dimension]}``.

        Those behind the first demand refused are refused too (none of them jumps it),
        with its wait and dimension: none of them can be admitted before it is, so its
        wait is a lower bound of theirs, and a queue of them retries no sooner than the
        one at its head must."""
        members = self.members
        if isinstance(reply, BaseException) or len(members) == 1:
            for member in members:
                member[0].deliver(reply)
            return
        admitted = int(reply[0])
        account_now = reply[1]
        windows = self.windows
        at = 2 + admitted * windows
        refusal = reply[at : at + 2]
        start = 0
        for command, _, _, count in members:
            mine = min(max(admitted - start, 0), count)
            part = [mine, account_now, *reply[2 + start * windows : 2 + (start + mine) * windows]]
            if mine < count:
                part += refusal
            command.deliver(part)
            start += count


class _Settles:
    """The settles of one account posted together (none of a tenant with limits of its
    own), under the same keys, clock argument, key ttl, channel and window specs: sent
    as one run of the settle script, which ends them in order as if each ran alone at
    the same instant (settle.lua), each told its own part of the reply.

    It takes more settles until a sender takes it. A settle joining it goes out no
    later than it would have alone (ahead of what was queued after the first one):
    settles of different admissions commute, and most free something sooner; one
    that records more tokens than its admission reserved counts them sooner too,
    which a reserve queued before it then sees, as it would on a faster network.
    """

    __slots__ = ("args", "groups", "key", "members", "sending")

    # What the sender reads of a command: the script, loaded again on NOSCRIPT.
    script = SETTLE

    # Where the arguments of one admission are in a settle's EVALSHA (see settle.lua):
    # its lease id, refund flag, amounts reserved and used, slice indexes, tokens
    # counted, end (ARGV[3], [5], [7], [8], [9], [10], [11]; after "EVALSHA", the sha,
    # the key count and the key).
    OWN = (6, 8, 10, 11, 12, 13, 14)

    def __init__(self, key: tuple[str, ...], groups: dict[tuple[str, ...], _Settles]) -> None:
        self.key = key
        self.groups = groups
        self.members: list[_Command] = []
        # The EVALSHA of the settles, built when a sender takes it.
        self.args: tuple[str, ...] = ()
        self.sending = False

    def take(self) -> bool:
        """A sender takes it: it is closed to more settles, and the one EVALSHA of all
        of them is built (a lone settle's is its own)."""
        if self.groups.get(self.key) is self:
            del self.groups[self.key]
        members = self.members = [member for member in self.members if member.take()]
        if not members:
            return False
        self.sending = True
        if len(members) == 1:
            self.args = members[0].args
            return True
        args = list(members[0].args)
        for at in self.OWN:
            args[at] = "|".join([member.args[at] for member in members])
        self.args = tuple(args)
        return True

    def untake(self) -> None:
        self.sending = False
        for member in self.members:
            member.untake()

    def deliver(self, reply: Any) -> None:
        """Each settle's part of the reply: whether its lease was still live."""
        members = self.members
        if isinstance(reply, BaseException) or len(members) == 1:
            for member in members:
                member.deliver(reply)
            return
        for member, live in zip(members, reply, strict=True):
            member.deliver(live)


class _Step:
    """The settles and then the reserves of one account that a sender takes together,
    sent as one run of the step script (step.lua): the state is read, the clock read
    and the state written once for both (a task that calls in a loop posts its last
    call's settle just before its next reserve). They run as the two scripts would,
    back to back at one instant; the settles go first, as they may (`_Settles`)."""

    __slots__ = ("args", "reserves", "settles")

    script = STEP

    def __init__(self, settles: _Settles, reserves: _Reserves) -> None:
        self.settles = settles
        self.reserves = reserves
        ends, begins = settles.args, reserves.args
        keys = int(ends[2])
        # Each EVALSHA is ("EVALSHA", sha, key count, *keys, *arguments).
        self.args = STEP.evalsha(ends[3 : 3 + keys], [str(len(ends) - 3 - keys)])
        self.args += ends[3 + keys :] + begins[3 + keys :]

    @staticmethod
    def joins(settles: _Settles, reserves: _Reserves) -> bool:
        """Whether they can go as one step: the same keys (no tenant's) and clock
        argument."""
        ends, begins = settles.args, reserves.args
        keys = int(ends[2])
        return begins[2] == ends[2] and begins[3 : 4 + keys] == ends[3 : 4 + keys]

    def split(self, reply: Any, replies: dict[int, Any]) -> None:
        """Its `reply` as the settles' and the reserves' (by id in `replies`)."""
        if isinstance(reply, BaseException):
            replies[id(self.settles)] = replies[id(self.reserves)] = reply
        else:
            replies[id(self.settles)], replies[id(self.reserves)] = reply


def _steps(batch: list[_Sendable]) -> Sequence[_Wire]:
    """`batch` as sent: each account's settles and the first of its reserves taken with
    them made one `_Step`, in the reserves' place: the reserves keep their order among
    the account's other reserves (none queued after them runs first), and the settles
    go later or sooner within one write, as they may (`_Settles`)."""
    settles: dict[tuple[str, ...], tuple[int, _Settles]] = {}
    for i, command in enumerate(batch):
        if isinstance(command, _Settles):
            settles.setdefault(command.key, (i, command))
    if not settles:
        return batch
    sent: list[_Wire | None] = list(batch)
    for i, command in enumerate(batch):
        if not isinstance(command, _Reserves):
            continue
        for key, (j, ends) in settles.items():
            if _Step.joins(ends, command):
                sent[j] = None
                sent[i] = _Step(ends, command)
                del settles[key]
                break
        if not settles:
            break
    return [command for command in sent if command is not None]


# What a sender takes: a command, or reserves or settles of one account sent as one;
# and what it writes: those, or one account's settles and reserves as one step.
_Sendable = _Command | _Reserves | _Settles
_Wire = _Sendable | _Step


class _Watch:
    """A round trip under watch: given up (its sender cancelled) only when the server
    stops answering, not when it is merely slow."""

    __slots__ = ("done", "gave_up", "handle", "started", "task", "timeouts")

    def __init__(self, task: asyncio.Task[Any], started: float) -> None:
        self.task = task
        # When it began (loop time); the timer of its next look once it has been slow
        # (the first look is its sender's timer: `_Held.watching`).
        self.started = started
        self.handle: asyncio.TimerHandle | None = None
        self.timeouts = 0
        self.done = False
        self.gave_up = False


class _Unsent(asyncio.CancelledError):
    """A sender cancelled before it wrote anything of its batch (waiting for a
    connection): the batch can go again as it is."""


class _NothingWritten:
    """A step of a sender before any of its batch is written: a cancel there is
    `_Unsent`, and an error is marked unsent (`_unsent`). A class, not a generator's
    context manager: it runs twice per round trip."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if isinstance(exc, asyncio.CancelledError) and not isinstance(exc, _Unsent):
            raise _Unsent(*exc.args) from None
        if isinstance(exc, Exception):
            _mark_unsent(exc)


def _mark_unsent(exc: BaseException) -> None:
    """Say of `exc` that it failed a batch before any of it was written (see `_unsent`)."""
    with contextlib.suppress(AttributeError):  # an exception without a __dict__
        exc.ratekit_unsent = True  # type: ignore[attr-defined]


def _unsent(exc: BaseException | None) -> bool:
    """Whether `exc`, an outage that failed a command, surely came before any of it was
    written (Redis known down, or met while connecting): nothing of it ran."""
    return isinstance(exc, _Down) or getattr(exc, "ratekit_unsent", False)


_nothing_written = _NothingWritten()


def _connection_args(client: Client) -> tuple[str, ...]:
    """What the client's pool's get_connection is called with: nothing, or a command
    name where it still requires one (redis-py before 5.3; it is not used)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:  # a cluster client: it routes commands itself
        return ()
    parameter = inspect.signature(pool.get_connection).parameters.get("command_name")
    needs_name = parameter is not None and parameter.default is inspect.Parameter.empty
    return ("FCALL",) if needs_name else ()


# Words of recent commands seen twice, packed (see `_pack`): most words of an account's
# commands (a function's name, the key, the window specs, a ttl) come again in each;
# a word is kept from its second use, so that the words of one call alone (its lease
# id, its clock reading) only pass through `_SEEN_WORDS`. Each is emptied when full.
_PACKED_WORDS: dict[str, bytes] = {}
_SEEN_WORDS: set[str] = set()
_PACKED_WORDS_MAX = 512
_PACKED_WORD_MAX_LEN = 512  # window specs of several windows run to a few hundred


def _pack(commands: Sequence[tuple[str, ...]]) -> bytes:
    """`commands` in the Redis protocol (RESP), as one buffer. A first word that holds
    a space ("FUNCTION LOAD") is two words. The arguments are text, sent as UTF-8:
    redis-py's packer, made for any value, costs more than a whole script here."""
    parts: list[bytes] = []
    add = parts.append
    packed = _PACKED_WORDS
    for command in commands:
        head = command[0]
        words = [*head.split(), *command[1:]] if " " in head else command
        add(b"*%d\r\n" % len(words))
        for word in words:
            if word.__class__ is str:
                chunk = packed.get(word)
                if chunk is None:
                    data = word.encode()
                    chunk = b"$%d\r\n%s\r\n" % (len(data), data)
                    if len(data) <= _PACKED_WORD_MAX_LEN:
                        _keep(word, chunk)
                add(chunk)
            else:
                data = _encode(word)
                add(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _keep(word: str, chunk: bytes) -> None:
    """Keep `word` packed as `chunk` if it was seen before (see `_PACKED_WORDS`)."""
    if word in _SEEN_WORDS:
        if len(_PACKED_WORDS) >= _PACKED_WORDS_MAX:
            _PACKED_WORDS.clear()
        _PACKED_WORDS[word] = chunk
    else:
        if len(_SEEN_WORDS) >= _PACKED_WORDS_MAX:
            _SEEN_WORDS.clear()
        _SEEN_WORDS.add(word)


def _encode(word: object) -> bytes:
    """A word that is not text: bytes as they are, a number as its text."""
    if isinstance(word, bytes | bytearray | memoryview):
        return bytes(word)
    if isinstance(word, int | float) and not isinstance(word, bool):
        return repr(word).encode()
    if isinstance(word, str):  # a subclass of str (a str Enum): its text, not its name
        return str.encode(word)
    raise TypeError(f"a Redis command's argument must be text, bytes or a number, got {word!r}")


# redis-py's own public write of a packed command (see `_exchange`).
_SEND_PACKED = AbstractConnection.send_packed_command


async def _exchange(connection: Any, commands: Sequence[tuple[str, ...]]) -> list[Any]:
    """Send `commands` in one write on `connection` (a connection of a client's pool,
    not a cluster's) and read their replies, an error reply as its exception in its
    place. Lighter than a redis-py pipeline, whose own bookkeeping costs more than
    ratekit's scripts; like one, it never sends a command twice (a reply lost with
    the connection is an outage, not a cue to run a script again).

    Neither the write nor the reads have a timeout of their own (the client's socket
    timeout is not applied): the link's watch bounds the whole round trip
    (`_Link._round_trip`). A connection left mid-reply (an error, a cancel) is
    closed here, and made again when next taken from the pool."""
    data = _pack(commands)
    try:
        if type(connection).send_packed_command is _SEND_PACKED:
            # redis-py's write itself, without the public method's wait_for on the
            # client's socket timeout (a task and a timer per write, about a tenth of a
            # round trip's client time): the link's watch bounds the whole round trip.
            await connection._send_packed_command([data])
        else:
            # A connection class that has its own say on writes (a wrapper, a test
            # double) is written to through it.
            await connection.send_packed_command(data, check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                # Undecoded, whatever the client's decode_responses: ratekit writes
                # UTF-8 and reads it back as such (`_Link.utf8`).
                replies.append(
                    await connection.read_response(disable_decoding=True, timeout=math.inf)
                )
            except ResponseError as exc:
                replies.append(exc)
        return replies
    except BaseException:
        # Replies may still be on their way: nobody else may read them.
        await connection.disconnect(nowait=True)
        raise


async def _stale(connection: Any) -> bool:
    """Whether an open `connection` cannot carry a round trip: the server closed it
    (or, as redis-py 8's `can_read` also tells, something unread waits on it; before
    it, `can_read_destructive` sees only what its parser buffered)."""
    check = getattr(connection, "can_read", None) or connection.can_read_destructive
    try:
        return bool(await check())
    except (RedisConnectionError, OSError):
        return True  # redis-py found the socket gone


class _LazyTimer:
    """One timer for a run of deadlines of which only the newest counts (a sender's
    rests, its round trips): `arm` sets it for a deadline only when none is pending or
    the pending one is due later; when it fires, `due` names the deadline now (None:
    nothing to look at, until the next `arm`): a later one gets the timer moved on,
    one reached calls `act`. Not one timer made and cancelled per rest or round trip."""

    __slots__ = ("act", "due", "handle", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        due: Callable[[], float | None],
        act: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.due = due
        self.act = act
        self.handle: asyncio.TimerHandle | None = None

    def arm(self, due: float) -> None:
        handle = self.handle
        if handle is None or handle.when() > due:
            if handle is not None:
                handle.cancel()
            self.handle = self.loop.call_at(due, self._fire)

    def _fire(self) -> None:
        self.handle = None
        due = self.due()
        if due is None:
            return
        if self.loop.time() < due:
            self.handle = self.loop.call_at(due, self._fire)
        else:
            self.act()


class _Held:
    """The connection one sender keeps between its batches: taken from the client's
    pool for its first batch, given back when the sender has had nothing to send for
    `_LINGER_S`, when a round trip on it fails, and when the sender ends. A caller
    that comes back sooner (one task calling in a loop) skips the pool's lock and
    bookkeeping (ratekit checks the connection before each use: `_Link._connection`)."""

    __slots__ = (
        "check",
        "command_timeout_s",
        "connection",
        "lingering",
        "rest",
        "rested_at",
        "sender",
        "watch",
        "watching",
    )

    def __init__(
        self,
        sender: asyncio.Task[Any],
        loop: asyncio.AbstractEventLoop,
        command_timeout_s: float,
        check: Callable[[_Watch], None],
    ) -> None:
        # The sender's own task (its batches' watch cancels it), and its connection.
        self.sender = sender
        self.connection: Any = None
        # The sender's current rest (see `_Link._rest`), when it began (loop time), and
        # the timer that ends a rest that outlasts `_LINGER_S`.
        self.rest: asyncio.Future[bool] | None = None
        self.rested_at = 0.0
        self.lingering = _LazyTimer(loop, self._rest_due, self._rest_over)
        # The sender's last round trip under watch, and the timer that hands one that has
        # lasted the command timeout to `check` (`_Link._check`).
        self.watch: _Watch | None = None
        self.command_timeout_s = command_timeout_s
        self.check = check
        self.watching = _LazyTimer(loop, self._watch_due, self._look)

    def _rest_due(self) -> float | None:
        rest = self.rest
        return None if rest is None or rest.done() else self.rested_at + _LINGER_S

    def _rest_over(self) -> None:
        assert self.rest is not None
        self.rest.set_result(False)

    def _watch_due(self) -> float | None:
        watch = self.watch
        return None if watch is None or watch.done else watch.started + self.command_timeout_s

    def _look(self) -> None:
        assert self.watch is not None
        self.check(self.watch)


class _Link:
    """What a backend and its children share: one client, the event loop it is bound
    to, the commands waiting to be sent, the outage state and the work in the
    background.

    Commands are sent by at most `connections` senders at once, each taking every
    command waiting (up to `_BATCH`) and sending them in one pipeline on one
    connection: a burst of callers shares round trips instead of waiting for a
    connection each, and the reserves of one account among them run as one EVALSHA
    (`reserve`). Bound to the loop of its first use; `enter` refuses any other.
    """

    def __init__(
        self,
        client: Client,
        *,
        where: str,
        owns_client: bool,
        command_timeout_s: float,
        connections: int | None,
    ) -> None:
        self.client = client
        # Where Redis is, without credentials (for messages).
        self.where = where
        self.owns_client = owns_client
        self.command_timeout_s = command_timeout_s
        pool = getattr(client, "connection_pool", None)  # none for a cluster
        pool_size = getattr(pool, "max_connections", None)
        if not isinstance(pool_size, int) or pool_size <= 0:
            pool_size = None
        if connections is None:
            size = _CONNECTIONS + _POOL_SPARE if pool_size is None else pool_size
            connections = min(_CONNECTIONS, max(1, size - _POOL_SPARE))
        self.connections = connections
        # Whether a sender keeps its connection between batches (`_Held`): only where
        # the pool leaves `_POOL_SPARE` connections to the release listeners and the
        # user's own calls even with every sender holding one. In a smaller pool a
        # kept connection would starve them (a BlockingConnectionPool of 2: listener
        # and sender hold both while a task calls in a loop): it goes back after
        # each batch there.
        self.linger = pool_size is None or pool_size - connections >= _POOL_SPARE
        self.loop: asyncio.AbstractEventLoop | None = None
        # Commands waiting for a sender, oldest first.
        self.queue: deque[_Sendable] = deque()
        # The reserves in the queue still open to more callers, by what they share (see
        # `reserve`).
        self.reserves: dict[tuple[str, ...], _Reserves] = {}
        # The same for posted settles (see `post`).
        self.settles: dict[tuple[str, ...], _Settles] = {}
        # Senders running, and those idle, each waiting on its future: True for work
        # (or closing), False when it rested `_LINGER_S` (see `_rest`).
        self.senders = 0
        self.idle: deque[tuple[asyncio.Future[bool], asyncio.Task[Any]]] = deque()
        # The sender woken (or started) last, until a sender takes from the queue: it
        # will take what is posted meanwhile (see `_wake_sender`).
        self.coming: asyncio.Task[Any] | None = None
        # When (loop time) Redis last answered anything, and the PING in flight that
        # tells a slow server from a gone one.
        self.answered_at = -math.inf
        self.ping: asyncio.Task[bool] | None = None
        # Background tasks: senders, renewers, listeners, replays, late settles.
        self.tasks: set[asyncio.Task[Any]] = set()
        # Failures of background work that nothing else could report (bugs).
        self.errors: list[Exception] = []
        # Closing: background loops stop, commands still on their way are sent.
        # Closed: nothing is sent any more.
        self.closing = False
        self.closed = False
        # While Redis is down: when to try again, how many failures in a row, which
        # outage this is (counted from 1), and the last error's type (its text could
        # hold connection details).
        self.retry_at = 0.0
        self.failures = 0
        self.outage = 0
        self.down_at = 0.0  # monotonic s of the outage's first failure
        # Set when a round trip starts `_NEW_OUTAGE_AFTER_S` after the last failure
        # (`failed_at`, monotonic s) and none is on its way: the outage may have ended
        # unseen meanwhile, so its failure begins a new one. `sending` counts the round
        # trips on their way.
        self.stale = False
        self.failed_at = 0.0
        self.sending = 0
        # Whether the last failure was the server refusing our credentials: a setting
        # to fix, not an outage to wait out.
        self.refused = False
        self.last_error = ""
        # Writes that could not reach Redis, by key (a newer one replaces it), sent
        # again in order once Redis answers.
        self.pending: OrderedDict[object, tuple[tuple[str, ...], Script | None]] = OrderedDict()
        self.replayer: asyncio.Task[None] | None = None
        # Whether scripts run as functions of the library (FCALL): from the start, until
        # the server shows it has none (see `_loads`); EVALSHA for the link's life then.
        # Not on a cluster: redis-py's cluster client finds an FCALL's keys by asking a
        # node (COMMAND GETKEYS) on every call, an EVALSHA's by itself.
        # A cluster client (it routes each command itself), told once: an isinstance
        # check of RedisCluster goes through typing's protocol machinery (~3 µs).
        self.cluster = isinstance(client, RedisCluster)
        self.functions = not self.cluster
        # What a pool's get_connection takes: a command name before redis-py 5.3.
        self.connection_args = _connection_args(client)
        # The client's text encoding and its error handler, None for UTF-8 (see `utf8`).
        encoder = client.get_encoder() if hasattr(client, "get_encoder") else None
        self.encoding: tuple[str, str] | None = None
        if encoder is not None and codecs.lookup(encoder.encoding).name != "utf-8":
            self.encoding = (encoder.encoding, encoder.encoding_errors)
        # Whether what runs the scripts was sent since the link started or last lost
        # Redis: until then, a round trip carries it ahead of its commands, so that no
        # command is answered NOSCRIPT (and sent again after the ones behind it).
        self.loaded = False
        # Closes the link when the loop shuts down while it is open (`_at_shutdown`).
        self.shutdown_guard: AsyncGenerator[None, None] | None = None
        # Called first then, by each backend on the link: what it still has to post
        # (the refund of a credit's rest).
        self.at_shutdown: list[Callable[[], None]] = []
        # Writes posted (`post`) and not answered yet.
        self.posted: set[asyncio.Future[Any]] = set()

    # -- the loop ----------------------------------------------------------------------

    def enter(self, owner: object) -> None:
        """Bind to the running loop at first use; refuse any other loop after."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise WrongEventLoopError(
                f"{owner!r} runs on asyncio (redis-py's client) and was called outside a "
                "running asyncio event loop (trio, or no loop)"
            ) from None
        if loop is self.loop:
            return
        if self.loop is None:
            self.loop = loop
            self.spawn(self._watch_shutdown())
            return
        state = "closed" if self.loop.is_closed() else "still running"
        raise WrongEventLoopError(
            f"{owner!r} belongs to the event loop it was first used in (now {state}) and "
            "was used from another one: its Redis client's connections are bound to that "
            "loop. Build one RedisBackend (and limiter, and scheduler) per event loop, or "
            "call from threads through ratekit.SyncScheduler"
        )

    # -- outages -----------------------------------------------------------------------

    def reachable(self) -> bool:
        return self.failures == 0 or time.monotonic() >= self.retry_at

    def mark_down(self, exc: BaseException) -> None:
        if isinstance(exc, _Down):
            return
        self.last_error = type(exc).__name__
        self.refused = isinstance(exc, AuthenticationError)
        if self.failures and time.monotonic() < self.retry_at:
            return  # another call of the same outage: one failure per retry
        self.loaded = False  # a server back from a restart lacks the scripts
        clock = time.monotonic()
        stale, self.stale = self.stale, False
        if not self.failures or stale:
            # A new outage: the first failure, or the first of a round trip started
            # long after the last failure (the last outage may have ended while nothing
            # was sent, so no success said so). A retry that is slow to fail (a hung
            # server) or a renewal every few seconds is the same outage.
            self.outage += 1
            self.failures = 0
            self.down_at = clock
            _log.warning(
                "Redis at %s is unreachable (%s); tried again with a backoff",
                self.where,
                self.last_error,
            )
        delay = _BACKOFF_S[min(self.failures, len(_BACKOFF_S) - 1)]
        self.failures += 1
        self.failed_at = clock
        self.retry_at = clock + delay

    def mark_up(self) -> None:
        if self.failures:
            _log.warning(
                "Redis at %s answers again, %.1f s after it was found unreachable",
                self.where,
                time.monotonic() - self.down_at,
            )
            self.stale = False
        self.failures = 0
        if self.pending and (self.replayer is None or self.replayer.done()) and not self.closing:
            self.replayer = self.spawn(self._replay())

    # -- commands ----------------------------------------------------------------------

    async def call(
        self,
        args: tuple[str, ...],
        script: Script | None = None,
        *,
        abortable: bool,
        orphan: Callable[[asyncio.Future[Any]], None] | None = None,
    ) -> Any:
        """Send one command and wait for its reply, cancellably.

        If the caller is cancelled, a command not yet sent is dropped when
        `abortable` (and sent anyway otherwise); once sent, its reply goes to
        `orphan(future)` (by default: an outage is noted, anything else logged).
        While Redis is known to be down nothing is sent (`_Down`).
        """
        if self.closed or not self.reachable():
            raise _Down
        assert self.loop is not None
        future = self.loop.create_future()
        command = _Command(args, script, future, abortable=abortable, orphan=orphan or self.orphan)
        self.queue.append(command)
        self._wake_sender()
        return await self._reply(command)

    async def reserve(
        self,
        keys: list[str],
        args: list[str],
        count: int,
        windows: int,
        orphan: Callable[[asyncio.Future[Any]], None],
    ) -> Any:
        """Run the reserve script on `keys` with `args` (its seven, see reserve.lua) for
        `count` demands under `windows` windows, and wait for its reply, cancellably.

        Reserves waiting for a sender with the same keys and arguments but for their
        lease ids and demands run as one (`_Reserves`), in the order they came: a caller
        hears its own part of the reply, as if it had run alone. Cancellation and
        outages are those of `call` (abortable, with `orphan`).
        """
        if self.closed or not self.reachable():
            raise _Down
        assert self.loop is not None
        future = self.loop.create_future()
        command = _Command((), RESERVE, future, abortable=True, orphan=orphan)
        key = (*keys, *args[:3], *args[4:6])
        group = self.reserves.get(key)
        if group is None or group.count + count > _BATCH:
            group = self.reserves[key] = _Reserves(keys, args, windows, key, self.reserves)
            self.queue.append(group)
            self._wake_sender()
        group.add(command, args[3], args[6], count)
        return await self._reply(command)

    @staticmethod
    async def _reply(command: _Command) -> Any:
        """The reply to `command`, once a sender delivers it."""
        future = command.future
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                command.orphan(future)  # the reply came in the very step the caller left
            raise

    def orphan(self, future: asyncio.Future[Any]) -> None:
        """The reply to a command whose caller left: note an outage, log the rest."""
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None:
            self.mark_up()
        elif _is_outage(exc):
            self.mark_down(exc)
        else:
            _log.warning("a Redis command whose caller left failed: %r", exc)

    def _wake_sender(self) -> None:
        """An idle sender takes the queue, or a new one starts (up to `connections`);
        none while the sender woken last has yet to run and will take all that waits
        (a settle posted and the caller's next reserve go out together, and one
        connection serves a task that calls in a loop)."""
        coming = self.coming
        if coming is not None and not coming.done() and len(self.queue) <= _BATCH:
            return
        while self.idle:
            waiting, sender = self.idle.popleft()
            if not waiting.done():
                waiting.set_result(True)
                self.coming = sender
                return
        if self.senders < self.connections:
            self.senders += 1
            self.coming = self.spawn(self._send_loop())
            self.coming.add_done_callback(self._sender_ended)

    def _sender_ended(self, sender: asyncio.Task[Any]) -> None:
        """A sender ended (closing, or cancelled while the loop runs on, maybe before it
        ever ran): another takes the work it leaves in the queue. A sender that failed
        (a bug: `_send_batch` hands every failure of a round trip to its callers) fails
        that work with its error instead, rather than pass it to a sender that would
        fail the same way, again and again."""
        self.senders -= 1
        if not self.queue or self.closing:
            return
        error = None if sender.cancelled() else sender.exception()
        if isinstance(error, Exception):
            left = list(self.queue)
            self.queue.clear()
            self.reserves.clear()
            self.settles.clear()
            self._fail(left, error)
            return
        self._wake_sender()

    def utf8(self, value: bytes | str) -> str:
        """Text ratekit wrote (as UTF-8), as the client handed it back: bytes, or text
        decoded with the client's encoding when it decodes responses (pub/sub)."""
        if isinstance(value, bytes):
            return value.decode()
        if self.encoding is None:
            return value
        encoding, errors = self.encoding
        return value.encode(encoding, errors).decode("utf-8", "replace")

    async def _send_loop(self) -> None:
        """Send what waits, a batch at a time; idle until woken, until closing."""
        sender = asyncio.current_task()
        assert sender is not None
        assert self.loop is not None
        held = _Held(sender, self.loop, self.command_timeout_s, self._check)
        try:
            while True:
                while self.queue:
                    self.coming = None
                    batch = self._take_batch()
                    if batch:
                        await self._send_batch(batch, held)
                        if not self.linger:
                            await self._let_go(held)
                        _raise_if_cancelled(sender)
                if self.closing:
                    return
                await self._rest(held)
        finally:
            await self._let_go(held)

    async def _rest(self, held: _Held) -> None:
        """Wait until woken for work (or closing), or, with a connection held, until
        `_LINGER_S` passed: it goes back to the pool then (and the sender looks at the
        queue again before it waits on: work posted meanwhile woke nobody)."""
        assert self.loop is not None
        waiting: asyncio.Future[bool] = self.loop.create_future()
        self.idle.append((waiting, held.sender))
        if held.connection is None:
            await waiting
            return
        held.rest, held.rested_at = waiting, self.loop.time()
        held.lingering.arm(held.rested_at + _LINGER_S)
        if not await waiting:
            await self._let_go(held)

    async def _connection(self, held: _Held) -> Any:
        """A connection for the next round trip, connected and with nothing stray to
        read: the one `held` keeps, or one from the pool (kept from then on).
        One the server closed while it idled (a restart, an idle timeout, a CLIENT
        KILL) is opened again: nothing of the batch was written on it yet, so this is
        no outage (the pool does not check for that when it hands a connection out
        in redis-py 8 with maintenance notifications on)."""
        connection = held.connection
        if connection is None:
            pool = self.client.connection_pool  # type: ignore[union-attr]
            connection = held.connection = await pool.get_connection(*self.connection_args)
        try:
            if not connection.is_connected:
                await connection.connect()
            elif await _stale(connection):
                await connection.disconnect()
                await connection.connect()
        except BaseException:
            await self._let_go(held)
            raise
        return connection

    async def _let_go(self, held: _Held) -> None:
        """Give the connection `held` keeps back to the pool."""
        connection, held.connection = held.connection, None
        if connection is not None:
            await self.client.connection_pool.release(connection)  # type: ignore[union-attr]

    def _take_batch(self) -> list[_Sendable]:
        batch: list[_Sendable] = []
        queue = self.queue
        while queue and len(batch) < _BATCH:
            command = queue.popleft()
            if command.take():
                batch.append(command)
        return batch

    async def _send_batch(self, batch: list[_Sendable], held: _Held) -> None:
        """One pipeline; each command's reply (or error) goes where it belongs."""
        if not self.reachable():
            self._fail(batch, _Down())
            return
        if (
            self.failures
            and not self.sending
            and time.monotonic() - self.failed_at > _NEW_OUTAGE_AFTER_S
        ):
            self.stale = True
        pause_s = _POOL_RETRY_S[0]
        while True:
            try:
                try:
                    replies = await self._round_trip(batch, held)
                except MaxConnectionsError:
                    replies = [_POOL_BUSY] * len(batch)  # nothing was sent
                busy = []
                for command, reply in zip(batch, replies, strict=True):
                    if reply is _POOL_BUSY:
                        busy.append(command)
                    else:
                        command.deliver(reply)
                if not busy:
                    return
                # The pool is busy with someone else's calls: those commands were not
                # sent; they go again after a pause (outside the round trip's watch), and
                # a caller that leaves meanwhile drops its command.
                for command in busy:
                    command.untake()
                batch = busy
                with _nothing_written:
                    await asyncio.sleep(pause_s)
                pause_s = min(2 * pause_s, _POOL_RETRY_S[1])
                batch = [command for command in batch if command.take()]
                if not batch:
                    return
            except _Unsent:
                # Cancelled before a byte was written (the loop shuts down, the link
                # closes): back to the head of the queue, for whoever sends it next
                # (`_flush_at_shutdown`, or `aclose`'s failing of what is left).
                for command in reversed(batch):
                    command.untake()
                    self.queue.appendleft(command)
                raise  # if the loop runs on, another sender sends it (`_sender_ended`)
            except asyncio.CancelledError:
                self._fail(batch, _Down())  # closing: the callers' calls failed
                raise
            except Exception as exc:
                if _is_outage(exc):
                    self.mark_down(exc)
                self._fail(batch, exc)
                return

    async def _round_trip(self, batch: list[_Sendable], held: _Held) -> list[Any]:
        """The replies to `batch`, or TimeoutError when the server stopped answering.

        A round trip slower than `command_timeout_s` is not given up at once: a busy
        server (or a busy process) is slow, not down. While other round trips still
        come back, or else the server answers a PING on a connection of its own
        within the timeout, this one goes on, up to `_SLOW_LIMIT` timeouts in all.
        """
        assert self.loop is not None
        task = held.sender
        watch = held.watch = _Watch(task, self.loop.time())
        held.watching.arm(watch.started + self.command_timeout_s)
        self.sending += 1
        try:
            replies = await self._pipeline(batch, held)
        except asyncio.CancelledError as exc:
            if watch.gave_up and task.uncancel() == 0:
                error = TimeoutError(f"no reply from Redis within {self.command_timeout_s:g} s")
                if isinstance(exc, _Unsent):  # given up while connecting: nothing written
                    _mark_unsent(error)
                raise error from None
            raise
        finally:
            self.sending -= 1
            watch.done = True
            if watch.handle is not None:
                watch.handle.cancel()
        if watch.gave_up:
            task.uncancel()  # the replies won the race: the cancel is withdrawn
        self.answered_at = self.loop.time()
        return replies

    def _check(self, watch: _Watch) -> None:
        """A round trip outlasted the command timeout: go on while Redis answers."""
        assert self.loop is not None
        if watch.done:
            return
        watch.timeouts += 1
        if self.loop.time() - self.answered_at < self.command_timeout_s:
            self._rearm(watch)  # other replies come back: busy, not gone
            return
        if self.ping is None or self.ping.done():
            self.ping = self.spawn(self._answers_ping())
        self.ping.add_done_callback(lambda ping: self._judge(watch, ping))

    def _judge(self, watch: _Watch, ping: asyncio.Task[bool]) -> None:
        if watch.done:
            return
        if not ping.cancelled() and ping.result():
            self._rearm(watch)
        else:
            watch.gave_up = True
            watch.task.cancel()

    def _rearm(self, watch: _Watch) -> None:
        assert self.loop is not None
        if watch.timeouts >= _SLOW_LIMIT:
            watch.gave_up = True
            watch.task.cancel()
        else:
            watch.handle = self.loop.call_later(self.command_timeout_s, self._check, watch)

    async def _answers_ping(self) -> bool:
        """Whether the server answers a PING within the command timeout, on a fresh
        connection outside the pool (the pool may be the slow part)."""
        assert self.loop is not None
        if isinstance(self.client, RedisCluster):
            try:
                async with asyncio.timeout(self.command_timeout_s):
                    await self.client.ping()
                self.answered_at = self.loop.time()
                return True
            except Exception:
                return False
        # Through a Callable: whether redis-py annotates make_connection varies by release.
        make_connection: Callable[[], Any] = self.client.connection_pool.make_connection
        connection = make_connection()
        try:
            async with asyncio.timeout(self.command_timeout_s):
                await connection.connect()
                await connection.send_command("PING")
                await connection.read_response()
            self.answered_at = self.loop.time()
            return True
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                await connection.disconnect()

    async def _pipeline(self, batch: list[_Sendable], held: _Held) -> list[Any]:
        """Send `batch` in one write on the connection the sender holds (`_Held`,
        `_exchange`); a script the server lacks is loaded, and its commands sent again,
        in the next write on it (see `_loads`). An error reply is returned in its
        command's place. A cluster client routes each command itself."""
        if self.cluster:
            if not self.loaded:
                for script in SCRIPTS:
                    await self.client.script_load(script.text)  # on every primary
                self.loaded = True
            if len(batch) == 1:
                return [await self._one(batch[0])]
            return await self._cluster_batch(batch)
        with _nothing_written:
            connection = await self._connection(held)
        try:
            with _nothing_written:
                await connection.check_health()  # the client's own PING, if it asks for one
            sent = _steps(batch)
            first = [] if self.loaded else self._all_loads()
            replies = await _exchange(connection, [*first, *map(self._wire, sent)])
            for load, answer in zip(first, replies, strict=False):
                self._loaded(load, answer)
            self.loaded = True
            del replies[: len(first)]
            for _ in range(_LOAD_TRIES):
                if not any(isinstance(reply, ResponseError) for reply in replies):
                    break  # nothing the server lacked
                again, loads = self._loads(replies, sent)
                if not again:
                    break
                answers = await _exchange(
                    connection, [*loads, *(self._wire(sent[i]) for i in again)]
                )
                for load, answer in zip(loads, answers, strict=False):
                    self._loaded(load, answer)
                for i, reply in zip(again, answers[len(loads) :], strict=True):
                    replies[i] = reply
            if len(sent) == len(batch):
                return replies
            by_id: dict[int, Any] = {}
            for command, reply in zip(sent, replies, strict=True):
                if isinstance(command, _Step):
                    command.split(reply, by_id)
                else:
                    by_id[id(command)] = reply
            return [by_id[id(command)] for command in batch]
        except BaseException:
            await self._let_go(held)  # closed by `_exchange` if anything was written
            raise

    async def _cluster_batch(self, batch: list[_Sendable]) -> list[Any]:
        """The replies to `batch` on a cluster, whose client routes each command to its
        node itself (no pipelines): `_CLUSTER_FANOUT` commands at once, so that the
        senders together never need more of a node's connections than its pool holds
        (100 by default). A command refused a connection all the same (the pool is
        busy with the user's own calls) was not sent: its reply is `_POOL_BUSY`, and
        the sender sends it again after a pause (`_send_batch`); the others' replies
        stand (sending them again would run them twice)."""
        replies: list[Any] = []
        for start in range(0, len(batch), _CLUSTER_FANOUT):
            got = await asyncio.gather(
                *(self._one(command) for command in batch[start : start + _CLUSTER_FANOUT]),
                return_exceptions=True,
            )
            for reply in got:
                if isinstance(reply, MaxConnectionsError):
                    replies.append(_POOL_BUSY)
                elif isinstance(reply, BaseException) and not isinstance(reply, ResponseError):
                    raise reply  # a failure of the round trip, as one pipeline's
                else:
                    replies.append(reply)
        return replies

    async def _one(self, command: _Sendable) -> Any:
        """Send a lone command to a cluster; its reply, or its error reply as an
        exception. A script the server lacks is loaded on every primary, and the command
        sent again (see `_loads`)."""
        send: Callable[..., Awaitable[Any]] = self.client.execute_command
        reply: Any = None
        for tried in range(_LOAD_TRIES + 1):
            try:
                return await send(*self._wire(command))
            except ResponseError as exc:
                reply = exc
            again, loads = self._loads([reply], [command])
            if not again or tried == _LOAD_TRIES:
                break
            for load in loads:
                try:
                    answer = await send(*load)
                except ResponseError as exc:
                    answer = exc
                self._loaded(load, answer)
        return reply

    def _all_loads(self) -> list[tuple[str, ...]]:
        """What loads every script: the library, or each script while on EVALSHA."""
        if self.functions:
            return [LIBRARY.load()]
        return [script.load() for script in SCRIPTS]

    def _wire(self, command: _Wire) -> tuple[str, ...]:
        """What is sent for `command`: a script's EVALSHA as its function's FCALL while
        the link runs functions."""
        script = command.script
        if script is None or not self.functions:
            return command.args
        return script.fcall(command.args)

    def _loads(
        self, replies: Sequence[Any], commands: Sequence[_Wire]
    ) -> tuple[list[int], list[tuple[str, ...]]]:
        """Of the `replies` to `commands`, the indexes of those to send again, and what
        to send before them: the library when a function was not found (a restart, a
        flush), every script when the server answered NOSCRIPT. A
        server without functions (a command it does not know or lets nobody run) turns
        the link to EVALSHA for good, and the scripts are loaded instead."""
        scripts = [command.script for command in commands]
        refused = self.functions and any(
            _no_functions(reply) for reply, script in zip(replies, scripts, strict=True) if script
        )
        if refused:
            self.functions = False
            _log.info("Redis at %s runs no functions: scripts are sent by EVALSHA", self.where)
        again = [
            i
            for i, (reply, script) in enumerate(zip(replies, scripts, strict=True))
            if script is not None
            and (
                isinstance(reply, NoScriptError)
                or _function_not_found(reply)
                or (not self.functions and _no_functions(reply))  # an FCALL, sent before
            )
        ]
        # Whatever flushed one script flushed them all: all are loaded again at once.
        return again, self._all_loads() if again else []

    def _loaded(self, load: tuple[str, ...], answer: Any) -> None:
        """The server's answer to `load`: a library it refuses leaves functions for
        EVALSHA, for the link's life."""
        if self.functions and load == LIBRARY.load() and isinstance(answer, Exception):
            self.functions = False
            _log.warning(
                "Redis at %s refused ratekit's function library (%s): scripts are sent by EVALSHA",
                self.where,
                answer,
            )

    @staticmethod
    def _fail(batch: Sequence[_Sendable], exc: Exception) -> None:
        for command in batch:
            command.deliver(exc)

    # -- the background ----------------------------------------------------------------

    async def _watch_shutdown(self) -> None:
        """Have the loop's shutdown close the link (see `_at_shutdown`)."""
        self.shutdown_guard = guard = _at_shutdown(self)
        await anext(guard)

    async def _flush_at_shutdown(self) -> None:
        """The loop shuts down (`asyncio.run` ends) with the link open: its tasks were
        cancelled. What waits in the queue never left and is sent now; what the senders
        had on its way was kept for the replay (a settle; a refund without a lease is not
        kept, as it may have arrived); both within `aclose`'s few seconds, as when the
        link is closed."""
        await asyncio.sleep(0)  # the callbacks of what the cancelled senders failed run
        self.failures = 0
        for post in self.at_shutdown:
            post()
        if self.queue:
            self._wake_sender()  # what never left is sent as it is (refunds too)
        await self.aclose()

    def spawn(self, coroutine: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
        """Run `coroutine` in the background; a failure it did not handle is logged at
        once and raised again by `aclose`."""
        assert self.loop is not None
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self._surface)
        return task

    def _surface(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if isinstance(exc, Exception):
            _log.error("ratekit's Redis background work failed", exc_info=exc)
            self.errors.append(exc)

    def defer(self, key: object, args: tuple[str, ...], script: Script | None) -> None:
        """Keep a write for when Redis answers again (a newer one under `key` replaces
        it); beyond `_MAX_PENDING` the oldest is dropped with a warning.

        The refund of an admission without a lease is not kept: sent again after a
        reply that was lost, it would give back twice. What it counted stays counted.
        """
        if key == NO_LEASE:
            return
        self.pending.pop(key, None)
        self.pending[key] = (args, script)
        if len(self.pending) > _MAX_PENDING:
            dropped, _ = self.pending.popitem(last=False)
            _log.warning(
                "Redis at %s down too long: dropped a queued write (%r); its lease lapses "
                "on its own",
                self.where,
                dropped,
            )

    def post(
        self,
        args: tuple[str, ...],
        script: Script | None,
        done: Callable[[asyncio.Future[Any]], None],
    ) -> bool:
        """Queue a write nobody waits for: it goes out with the next batch (after what
        was queued before it, ahead of what comes after: a caller that retries once a
        settle is posted has its reserve sent behind the settle, in the same round trip
        when one sender takes both), and its reply or error goes to `done`. Settles of
        one account posted before a sender takes the first run as one (`_Settles`).
        False, with nothing queued, while Redis is known to be down or the link is
        closed."""
        if self.closed or not self.reachable():
            return False
        assert self.loop is not None
        future = self.loop.create_future()
        self.posted.add(future)
        future.add_done_callback(self.posted.discard)
        future.add_done_callback(done)
        command = _Command(args, script, future, abortable=False, orphan=done)
        if script is not SETTLE or args[2] != "1":  # a tenant's settles go alone
            self.queue.append(command)
            self._wake_sender()
            return True
        # Settles of one account posted while none was sent yet go as one (`_Settles`):
        # its key, clock argument, key ttl, channel and window specs.
        key = (args[3], args[4], args[5], args[7], args[9])
        group = self.settles.get(key)
        if group is None or len(group.members) >= _BATCH:
            group = self.settles[key] = _Settles(key, self.settles)
            self.queue.append(group)
            self._wake_sender()
        group.members.append(command)
        return True

    async def posted_answered(self) -> None:
        """Wait until every write posted so far is answered (or failed): a read after
        it sees them. Cancelling the wait leaves the writes going."""
        if self.posted:
            await asyncio.wait(list(self.posted))

    async def _replay(self, *, closing: bool = False) -> None:
        """Send the writes kept while Redis was down, oldest first, a batch at a time.
        A network failure stops the replay until Redis answers again; any other
        failure drops that write with a warning, so it cannot block the ones after it.
        """
        while self.pending and (closing or not self.closing):
            _raise_if_cancelled()
            chunk = list(itertools.islice(self.pending.items(), _BATCH))
            outcomes = await asyncio.gather(
                *(self.call(args, script, abortable=False) for _, (args, script) in chunk),
                return_exceptions=True,
            )
            down = False
            for (key, entry), outcome in zip(chunk, outcomes, strict=True):
                if isinstance(outcome, BaseException) and _is_outage(outcome):
                    self.mark_down(outcome)
                    down = True
                    continue  # kept for the next replay
                if isinstance(outcome, BaseException):
                    _log.warning("dropped a queued Redis write (%r) that failed: %r", key, outcome)
                if self.pending.get(key) == entry:
                    del self.pending[key]
            if down:
                return

    async def aclose(self) -> None:
        """Let writes on their way finish and send those kept from an outage (a few
        seconds at most), then stop the rest."""
        assert self.loop is not None
        self.closing = True
        while self.idle:  # idle senders see the closing and end
            waiting, _ = self.idle.popleft()
            if not waiting.done():
                waiting.set_result(True)
        deadline = self.loop.time() + _CLOSE_WAIT_S
        running = [task for task in self.tasks if not task.done()]
        if running:
            await asyncio.wait(running, timeout=_CLOSE_WAIT_S)
        if self.pending:
            # One last try, after the backoff if it ends in time.
            wait_s = max(self.retry_at - time.monotonic(), 0.0) if self.failures else 0.0
            left_s = deadline - self.loop.time()
            if wait_s < left_s:
                await asyncio.sleep(wait_s)
                self.failures = 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(left_s - wait_s, 0.1)):
                        await self._replay(closing=True)
        if self.pending:
            _log.warning(
                "Redis at %s: %d settles could not be sent before closing; their leases "
                "lapse on their own",
                self.where,
                len(self.pending),
            )
        self.closed = True
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=_CLOSE_WAIT_S)
        self._fail(list(self.queue), _Down())
        self.queue.clear()
        self.reserves.clear()
        self.settles.clear()
        if self.owns_client:
            await self.client.aclose()


async def _at_shutdown(link: _Link) -> AsyncGenerator[None, None]:
    """Suspended for the link's life once started: the event loop closes every async
    generator still open when it shuts down (after cancelling its tasks), and this one
    then closes the link, unless it was closed before."""
    try:
        yield
    finally:
        if not link.closing:
            await link._flush_at_shutdown()


class RedisBackend:
    """Keeps one account's usage in Redis, shared by every process that names it.

    `redis` is a ``redis://`` or ``rediss://`` URL (a password in it is never
    shown in an error, a log or a repr), a ``redis.asyncio.Redis`` client or a
    ``redis.asyncio.cluster.RedisCluster`` client (a client is left open by
    `aclose`). With ``cluster=True`` the URL names one node of a Redis Cluster
    (Valkey's too): an account's keys share one hash tag, so each of its scripts
    runs on the one node that holds them. `namespace` names the account:
    processes with the same namespace share limits, others never touch each
    other's counts.

    `lease_ttl_s`: how long a concurrency slot outlives a holder that stops
    renewing (a killed process, a dropped admission). `on_unavailable` says what
    to do while Redis cannot be reached: ``"fail_closed"`` (default) admits nothing,
    ``"fail_open"`` admits everything, ``"local"`` admits within `local_share` of
    the limits kept in this process. Failing closed, callers wait for Redis as for
    capacity, for at most `outage_wait_s` (60 s; 0: not at all; fail_closed only),
    counted on the limiters' clock from this backend's first call that met the
    outage: a restart or a failover is waited out, and then they are admitted in
    their order. Past it (or at a caller's own timeout, also while a round trip
    hangs, or at once when the server refuses the credentials) they get
    `BackendUnavailableError`; `try_acquire` meanwhile returns None.
    Redis is tried again after a short backoff, and used as soon as it answers;
    settles that could not be sent meanwhile are sent then.

    `credits`: by default an admission that takes no lease (requests counted at
    admission, no concurrency cap, no pacing, no calendar day, no tenant limits) draws
    now and then a credit of requests for this process's next calls in the same slice,
    which are then admitted without a round trip; what is left is refunded when the
    credit ends, at the slice's end or within `CREDIT_S` (1 s). Counts stay exact for
    this process and never low for others, who may see up to one credit (at most a
    sixteenth of a limit, 256 requests) counted ahead for that long. ``False``: every
    admission is a round trip.

    `server_time`: by default the server's ``TIME`` is the clock (shared by every
    pod) and the limiter's instant is ignored; ``False`` uses the limiter's instant
    instead (its monotonic reading for windows, pacing and leases, its wall reading
    for calendar days): for tests with a `FakeClock`, in one process only.

    `command_timeout_s` bounds the wait for a reply, whatever the client's own
    socket timeouts: a round trip with no reply within it, from a server that then
    answers no PING within it either, counts as unreachable (a hung server is
    given up after about twice the timeout); a server that is slow but answers is
    waited for, up to five timeouts. `connections`: how many of the client's
    connections send commands at once (default: its pool size less a few spare
    ones, at most 8); callers beyond wait for their turn, which never counts as an
    outage, and share round trips (pipelined). A sender keeps its connection while
    calls keep coming (back to the pool after half a second idle) where the pool
    still leaves a few spare; in a smaller pool it gives it back after each round
    trip. Reserves of the account (without tenant limits) that wait for a
    connection together run as one script, in the order they came: one refused,
    those behind it are refused too with its wait (a queue keeps its order), never
    admitted past it.

    Every call may be cancelled at any point: a `reserve` whose caller left is
    never admitted (a grant that arrives after is refunded by the backend), a
    `settle` goes on. A grant its holder dropped is no longer renewed; `abandon`
    (on this backend's loop) settles it in the background at once.

    One instance (and its children) serves any number of limiters of the asyncio
    loop it is first used in; another loop gets `WrongEventLoopError`. Close it
    with `aclose`, which sends the settles still on their way.
    """

    def __init__(
        self,
        redis: str | Redis | RedisCluster,
        *,
        namespace: str,
        lease_ttl_s: float = 10.0,
        on_unavailable: OnUnavailable = "fail_closed",
        outage_wait_s: float = 60.0,
        local_share: float = 1.0,
        prefix: str = "ratekit",
        server_time: bool = True,
        command_timeout_s: float = 2.0,
        connections: int | None = None,
        cluster: bool = False,
        credits: bool = True,
    ) -> None:
        namespace = _check_name("namespace", namespace)
        if not isinstance(credits, bool):
            raise InvalidArgumentError(f"RedisBackend.credits must be a bool, got {credits!r}")
        prefix = _check_name("prefix", prefix)
        if on_unavailable not in _POLICIES:
            raise LimitsError(
                f"RedisBackend.on_unavailable must be one of {', '.join(_POLICIES)}, "
                f"got {on_unavailable!r}"
            )
        if isinstance(local_share, bool) or not isinstance(local_share, int | float):
            raise InvalidArgumentError(
                f"RedisBackend.local_share must be a number, got {local_share!r}"
            )
        if not 0 < local_share <= 1:
            raise LimitsError(f"RedisBackend.local_share must be in (0, 1], got {local_share!r}")
        lease_ttl = _check_number("lease_ttl_s", lease_ttl_s, *_LEASE_TTL_RANGE_S)
        outage_wait = _check_number("outage_wait_s", outage_wait_s, *_OUTAGE_WAIT_RANGE_S)
        timeout_s = _check_number("command_timeout_s", command_timeout_s, *_COMMAND_TIMEOUT_RANGE_S)
        if not isinstance(server_time, bool):
            raise InvalidArgumentError(
                f"RedisBackend.server_time must be True or False, got {server_time!r}"
            )
        if connections is not None and (
            isinstance(connections, bool) or not isinstance(connections, int) or connections < 1
        ):
            raise InvalidArgumentError(
                f"RedisBackend.connections must be a positive int or None, got {connections!r}"
            )
        client: Client
        if not isinstance(cluster, bool):
            raise InvalidArgumentError(
                f"RedisBackend.cluster must be True or False, got {cluster!r}"
            )
        if cluster and not isinstance(redis, str):
            raise InvalidArgumentError(
                "RedisBackend.cluster=True takes a URL; pass a client of a cluster as a "
                "redis.asyncio.cluster.RedisCluster instead"
            )
        if isinstance(redis, str):
            where = _check_url(redis)
            # Our own backoff and policy decide about outages: no backoff of redis-py's
            # (one quick reconnect for what goes through redis-py's own calls, such as
            # the release listener; a connection the pool gives ratekit's batches is
            # checked by the pool, and a batch is never sent twice).
            # The link's watch bounds each round trip (`_round_trip`), so a plain
            # client's sockets get no timeout of their own: redis-py would give up a
            # slow server's reply before the watch's five timeouts, and wrap every
            # write in a task of its own.
            try:
                if cluster:
                    client = RedisCluster.from_url(
                        redis, socket_connect_timeout=1.0, socket_timeout=timeout_s
                    )
                    where = f"redis cluster at {where}"
                else:
                    client = Redis.from_url(
                        redis,
                        socket_connect_timeout=1.0,
                        socket_timeout=None,
                        retry=Retry(NoBackoff(), 1),
                    )
            except (ValueError, TypeError) as error:  # redis-py's reading of the options
                raise InvalidArgumentError(
                    f"RedisBackend.redis: the URL {where} has an option redis-py cannot "
                    f"read: {error}"
                ) from None
            owns_client = True
        elif isinstance(redis, Redis | RedisCluster):
            where, client, owns_client = _describe(redis), redis, False
        else:
            raise InvalidArgumentError(
                "RedisBackend.redis must be a redis:// URL, a redis.asyncio.Redis client or "
                f"a redis.asyncio.cluster.RedisCluster client, got {type(redis).__name__}"
            )
        link = _Link(
            client,
            where=where,
            owns_client=owns_client,
            command_timeout_s=timeout_s,
            connections=connections,
        )
        self._setup(
            link,
            namespace,
            prefix,
            lease_ttl,
            on_unavailable,
            outage_wait,
            float(local_share),
            server_time,
            credits,
        )
        self._is_root = True

    def _setup(
        self,
        link: _Link,
        namespace: str,
        prefix: str,
        lease_ttl_s: float,
        policy: OnUnavailable,
        outage_wait_s: float,
        local_share: float,
        server_time: bool,
        credits: bool,
    ) -> None:
        self._link = link
        self._credits = credits
        link.at_shutdown.append(partial(self._end_credit, None))
        self.namespace = namespace
        self._prefix_root = prefix
        self._prefix = f"{prefix}:{{{namespace}}}:v{LAYOUT}"
        self._channel = f"{self._prefix}:released"
        self._lease_ttl_s = lease_ttl_s
        self._lease_ttl_text = repr(lease_ttl_s)
        self._policy: OnUnavailable = policy
        self._outage_wait_s = outage_wait_s
        self._local_share = local_share
        self._server_time = server_time
        self._lease_ids = itertools.count()
        self._instance = os.urandom(6).hex()
        self._binding: _Binding | None = None
        # The credit admissions come from while it lasts (see `_Credit`); how many
        # requests the next one asks for (0: none); whether a draw is on its way; when
        # the last admission of a binding that draws credits went to Redis (monotonic).
        self._credit: _Credit | None = None
        self._credit_size = 0.0
        self._drawing = False
        self._last_drawless = -math.inf
        # Bumped by whatever ends credits (`_stop_credits`): a draw on its way while it
        # changed is refunded when its reply comes.
        self._credit_epoch = 0
        # Whether calls that could draw credits came (the listener is wanted for them),
        # and whether it hears the account's channel now: credits are drawn only then,
        # so that a pause elsewhere ends them at once (see `_dispatch`).
        self._credit_listen = False
        self._hearing = False
        # The latest instant a limiter handed in: background work's clock when the
        # server's TIME is not used.
        self._last_now = Instant(-math.inf, -math.inf)
        # Leases of calls in flight from this process, renewed while their grant lives.
        self._live: dict[str, tuple[weakref.ref[RedisGrant], _Binding]] = {}
        self._listeners = Listeners()
        self._renewer: asyncio.Task[None] | None = None
        self._subscriber: asyncio.Task[None] | None = None
        self._closed = False
        self._children: list[RedisBackend] = []
        self._tier_callbacks: list[Callable[[str], None]] = []
        self._fallback = MemoryBackend()
        # A slot freed in the fallback must wake this backend's waiters too.
        self._fallback.subscribe(self._listeners.notify)
        self._fallback_limits: tuple[Limits, Limits] | None = None
        # Where tenants' keys live: under the root account's hash tag (a child's
        # tenants are the account's: a tenant's limits span its models).
        self._tenant_prefix = self._prefix
        # The bindings of tenants' limits, by the identity of their `Limits` (a few
        # values, each shared by many tenants).
        self._tenant_bindings: dict[int, tuple[Limits, _Binding]] = {}
        # Told the tenant's name when one of its calls ended (`subscribe_tenants`).
        self._tenant_listeners = Listeners()
        # When to look for an earlier version's keys next (monotonic s; inf: found).
        self._legacy_due = 0.0
        # The outage this backend's calls met last (`_Link.outage`), and the instant
        # of the first that met it (see `_outage_age_s`).
        self._outage_seen: tuple[int, float] | None = None

    def __repr__(self) -> str:
        return f"RedisBackend({self._link.where}, namespace={self.namespace!r})"

    @property
    def client(self) -> Client:
        return self._link.client

    @property
    def waits_from_instant(self) -> bool:
        """Whether a refusal's wait runs from the limiter's instant (``server_time=False``)
        rather than from the server's reading of its own clock."""
        return not self._server_time

    def key_prefix(self) -> str:
        """The prefix (with the account's hash tag) of every key of this account."""
        return self._prefix

    # -- binding and time -------------------------------------------------------------

    def _bind(self, limits: Limits) -> _Binding:
        binding = self._binding
        if self._legacy_due <= time.monotonic():
            self._look_for_legacy()
        if binding is None or (binding.limits is not limits and binding.limits != limits):
            binding = self._binding = _Binding(
                limits, _account_keys(self._prefix), self._lease_ttl_s
            )
        return binding

    def _look_for_legacy(self) -> None:
        """Warn, once per backend, when the account's state key of a ratekit version
        that did not name keys with their layout exists: pods of that version use the
        namespace now (or did, within a key ttl), and their counts are not this
        version's. Looked for at the first call and then every `_LEGACY_LOOK_S` (an
        old pod may start later), until found; the look rides with the next batch
        sent, not waited for, and is made again at the next call when Redis did not
        answer it."""
        legacy = _legacy_state_key(self._prefix_root, self.namespace)

        def heard(reply: asyncio.Future[Any]) -> None:
            if reply.cancelled():
                self._legacy_due = 0.0  # never sent: asked again at the next call
                return
            error = reply.exception()
            if error is not None:
                if _is_outage(error):
                    self._legacy_due = 0.0  # unreachable now: asked again at the next call
                else:  # not allowed (an ACL), or not understood: not asked again
                    self._legacy_due = math.inf
                    _log.debug("could not look for an earlier version's keys: %r", error)
                return
            if not reply.result():
                return
            self._legacy_due = math.inf
            _log.warning(
                "%s holds %r, the state of namespace %r as an earlier ratekit version "
                "keeps it: pods of that version share its limits among themselves, not "
                "with this version's (whose keys are named with layout v%d), so together "
                "they may send up to twice the limits until the old pods stop; upgrade a "
                "fleet by stopping the old pods first",
                self._link.where,
                legacy,
                self.namespace,
                LAYOUT,
            )

        if self._link.post(("EXISTS", legacy), None, heard):
            self._legacy_due = time.monotonic() + _LEGACY_LOOK_S

    def _enter(self, now: Instant | None = None, *, settling: bool = False) -> bool:
        """Check the loop and note the instant; False for a settle after `aclose` (its
        lease lapses), a typed error for anything else after it."""
        if self._closed or self._link.closed:
            if settling:
                return False
            if self._link.loop is not None:
                # Closed with its loop's end (asyncio.run returned): from another loop,
                # that is the error to name.
                self._link.enter(self)
            raise BackendUnavailableError(f"{self!r} is closed")
        self._link.enter(self)
        if now is not None and now.mono >= self._last_now.mono:
            self._last_now = now
        return True

    def _clock_arg(self, now: Instant | None = None) -> str:
        """The scripts' time argument: "" for the server's TIME, else "<mono> <wall>"."""
        if self._server_time:
            return ""
        instant = self._last_now if now is None else now
        wall = instant.wall if math.isfinite(instant.wall) else instant.mono
        return f"{instant.mono!r} {wall!r}"

    def _wall(self, now: Instant | None) -> float:
        """The wall clock for a calendar day's zone lookup (the client's own)."""
        if now is not None and math.isfinite(now.wall):
            return now.wall
        return time.time()

    # -- the Backend protocol ----------------------------------------------------------

    async def reserve(self, limits: Limits, demand: Demand, now: Instant) -> Grant | Refusal:
        """Admit `demand` atomically on every dimension, or say how long to wait.

        Cancellable at any point: a grant that arrives after the caller left is
        refunded by the backend (`settle` with nothing used).
        """
        grants, refusal = await self._reserve_many(limits, (demand,), now, None)
        if grants:
            return grants[0]
        assert refusal is not None
        return refusal

    async def reserve_many(
        self, limits: Limits, demands: Sequence[Demand], now: Instant
    ) -> tuple[list[Grant], Refusal | None]:
        """Admit `demands` in order, each atomically on every dimension, until one does not
        fit: the grants of those admitted, and the refusal of the first that was not
        (None when all were). One round trip, in one script: nothing can come between
        them, so a queue served this way keeps its order.

        Cancellable like `reserve`: grants that arrive after the caller left are
        refunded by the backend.
        """
        return await self._reserve_many(limits, demands, now, None)

    async def reserve_tenants(
        self,
        limits: Limits,
        demands: Sequence[Demand],
        now: Instant,
        tenants: Sequence[TenantShare | None],
    ) -> tuple[list[Grant], Refusal | None]:
        """`reserve_many`, each demand also on the own limits of its tenant (None: none),
        in the same script: the tenant's windows and cap are checked first (a refusal by
        them names a dimension after `TENANT_PREFIX`), and a demand is taken from both,
        or from neither."""
        parts = [self._tenant_part(share) for share in tenants]
        return await self._reserve_many(limits, demands, now, parts)

    def _tenant_part(self, share: TenantShare | None) -> _TenantPart | None:
        """The keys and binding of a tenant with limits of its own (None: none)."""
        if share is None:
            return None
        name, limits = share
        cached = self._tenant_bindings.get(id(limits))
        if cached is None or cached[0] is not limits:
            if len(self._tenant_bindings) >= 256:
                self._tenant_bindings.clear()
            binding = _Binding(limits, [], self._lease_ttl_s, _tenant_window_id)
            cached = self._tenant_bindings[id(limits)] = (limits, binding)
        return _TenantPart(name, cached[1], _tenant_keys(self._tenant_prefix, name))

    async def _reserve_many(
        self,
        limits: Limits,
        demands: Sequence[Demand],
        now: Instant,
        parts: Sequence[_TenantPart | None] | None,
    ) -> tuple[list[Grant], Refusal | None]:
        self._enter(now)
        link = self._link
        binding = self._bind(limits)
        if parts is not None and not any(parts):
            parts = None  # tenants without limits of their own: as no tenant at all
        asked = demands
        drawing = False
        if (
            self._credits
            and binding.credit_cap
            and parts is None
            and len(demands) == 1
            # The listener takes a connection of its own: only where the pool spares one.
            and link.linger
        ):
            turn = self._credit_turn(binding, demands[0], now)
            if isinstance(turn, RedisGrant):
                return [turn], None
            drawing = turn
        elif self._credit is not None:
            self._end_credit(now)  # counted exactly before any other reserve
        start_s, epoch = math.nan, 0
        if drawing:
            # Before the draw is sent (see `_drew`).
            start_s, epoch = self._credit_clock(now), self._credit_epoch
            size = float(min(binding.credit_cap, math.floor(self._credit_size)))
            demands = [demands[0], Demand(size, 0.0, 0.0)]
            lease_ids = [NO_LEASE, _CREDIT_LEASE]
        elif parts is None:
            if binding.leaseless:
                lease_ids = [NO_LEASE] * len(demands)
            elif len(demands) == 1:
                lease_ids = [f"{self._instance}:{next(self._lease_ids)}"]
            else:
                lease_ids = [f"{self._instance}:{next(self._lease_ids)}" for _ in demands]
        else:
            # A lease when the account or the tenant has something to end.
            lease_ids = [
                NO_LEASE
                if binding.leaseless and (part is None or part.binding.leaseless)
                else f"{self._instance}:{next(self._lease_ids)}"
                for part in parts
            ]
        # The wall clock matters only to a calendar day's spec.
        wall = self._wall(now) if binding.calendar or parts is not None else 0.0
        keys = binding.keys
        args = [
            self._clock_arg(now),
            binding.key_ttl_text,
            binding.concurrency,
            lease_ids[0] if len(lease_ids) == 1 else " ".join(lease_ids),
            self._lease_ttl_text,
            binding.specs(wall),
            _amounts(demands[0])
            if len(demands) == 1
            else "|".join(_amounts(demand) for demand in demands),
        ]
        orphan = partial(self._refund_orphan, binding, demands, lease_ids)
        try:
            if parts is None:
                # Run as one with the other reserves of the account waiting to be sent.
                self._drawing = self._drawing or drawing
                try:
                    reply = await link.reserve(keys, args, len(demands), len(binding.rates), orphan)
                finally:
                    if drawing:
                        self._drawing = False
            else:
                # With tenants: a run of its own (their keys and numbering are its own).
                keys, tenant_args = self._tenant_args(keys, parts, wall)
                args.extend(tenant_args)
                reply = await link.call(
                    RESERVE.evalsha(keys, args),
                    RESERVE,
                    abortable=True,
                    orphan=partial(orphan, parts=parts),
                )
        except Exception as exc:
            if not _is_outage(exc):
                raise
            link.mark_down(exc)
            if not _unsent(exc) and parts is None:
                self._release_unknown(binding, demands, lease_ids)
            return self._reserve_many_unavailable(limits, asked, now)
        link.mark_up()
        admitted, at = self._admitted(binding, parts, reply)
        account_now = float(reply[1])
        if drawing:
            if len(admitted) == 2:
                indexes = admitted.pop()[0]
                self._drew(binding, demands[1], indexes, account_now, now, start_s, epoch)
            demands = asked
        grants: list[Grant] = []
        leased = False
        for j, (indexes, part) in enumerate(admitted):
            grant = RedisGrant(binding, demands[j], lease_ids[j], indexes, tenant=part)
            grant.admitted = (account_now, now.mono)
            if lease_ids[j] != NO_LEASE:
                self._live[lease_ids[j]] = (weakref.ref(grant), binding)
                leased = True
            grants.append(grant)
        self._start(renew=leased)
        if len(admitted) == len(demands):
            return grants, None
        raw = reply[at + 1]
        if raw in _OUT_REPLIES:
            return grants, Refusal(float(reply[at]), OUT)
        dimension = int(raw)
        if dimension <= -2:
            assert parts is not None, "only a tenant's own limits refuse below -1"
            refused = parts[len(admitted)]
            assert refused is not None
            own = "concurrency" if dimension == -2 else refused.binding.names[-dimension - 3]
            name = TENANT_PREFIX + own
        elif dimension <= 0:
            name = "concurrency" if dimension == 0 else "cooldown"
        else:
            name = binding.names[dimension - 1]
        return grants, Refusal(float(reply[at]), name)

    @staticmethod
    def _tenant_args(
        keys: list[str], parts: Sequence[_TenantPart | None], wall: float
    ) -> tuple[list[str], list[str]]:
        """The keys of a reserve with tenants (the account's, then one per tenant), and
        the arguments after its first seven: the tenant of each demand, then four per
        tenant (see reserve.lua)."""
        keys = list(keys)
        numbers: dict[str, int] = {}
        which: list[str] = []
        per_tenant: list[str] = []
        for part in parts:
            if part is None:
                which.append("0")
                continue
            number = numbers.get(part.name)
            if number is None:
                number = numbers[part.name] = len(numbers) + 1
                keys.extend(part.keys)
                per_tenant.extend(part.binding.tenant_args(wall))
            which.append(str(number))
        return keys, [" ".join(which), *per_tenant]

    @staticmethod
    def _admitted(
        binding: _Binding, parts: Sequence[_TenantPart | None] | None, reply: Any
    ) -> tuple[list[tuple[list[str], _TenantPart | None]], int]:
        """What a reserve's reply says of each demand admitted: the slice indexes on the
        account's windows and its tenant's part; and where the refusal starts in it."""
        admitted: list[tuple[list[str], _TenantPart | None]] = []
        windows = len(binding.rates)
        at = 2
        for j in range(int(reply[0])):
            indexes = list(map(_text, reply[at : at + windows]))
            at += windows
            part = None if parts is None else parts[j]
            if part is not None:
                own = len(part.binding.rates)
                part = part.admitted(list(map(_text, reply[at : at + own])))
                at += own
            admitted.append((indexes, part))
        return admitted, at

    # -- credits (see `_Credit`) -------------------------------------------------------

    def _credit_turn(self, binding: _Binding, demand: Demand, now: Instant) -> RedisGrant | bool:
        """A lone `demand` under `binding`, which draws credits: its admission from the
        credit in force if that has room for it, else whether its reserve draws one (the
        credit in force, if any, has ended: used up, over, or drawn under other limits)."""
        credit = self._credit
        at_s = self._credit_clock(now)
        if credit is not None and credit.binding is not binding:
            self._end_credit(now)
        elif credit is not None:
            if at_s < credit.until and demand.requests <= credit.left:
                return self._from_credit(credit, demand)
            # Used up (the next one asks for twice as much), or over (as much as it used).
            self._credit_size = max(2.0, 2 * credit.drawn) if at_s < credit.until else credit.used
            self._end_credit(now)
        elif at_s - self._last_drawless < CREDIT_S:
            self._credit_size = max(self._credit_size, 2.0)  # calls keep coming
        self._last_drawless = at_s
        if not self._credit_listen:
            self._credit_listen = True
            self._start(renew=False)  # credits are drawn once it hears the channel
        return not self._drawing and self._credit_size >= 1 and self._hearing

    def _credit_clock(self, now: Instant) -> float:
        """What a credit's life is measured on: the account's clock runs in real time
        with the server's TIME (this process's monotonic clock, the event loop's, then
        follows it), else it is the limiter's (`now`)."""
        if self._server_time:
            return time.monotonic()
        return now.mono

    def _drew(
        self,
        binding: _Binding,
        demand: Demand,
        indexes: list[str],
        account_now: float,
        now: Instant,
        start_s: float,
        epoch: int,
    ) -> None:
        """A credit of `demand` was drawn (unless the script skipped it: indexes "-") in
        slices `indexes`, the account's clock reading `account_now` after `start_s`
        (`_credit_clock` before the draw was sent): it lasts until the earliest of those
        slices ends, reckoned from `start_s` (so never past that end), or `CREDIT_S`.
        One drawn after something ended credits while it was on its way
        (`_credit_epoch`: a pause here or elsewhere, a snapshot, `drain`, `aclose`) is
        refunded at once."""
        if indexes[0] == "-":
            return
        if self._credit is not None:
            self._end_credit(now)
        lasts_s = CREDIT_S
        for rate, index in zip(binding.rates, indexes, strict=True):
            slice_s = rate.period_s / rate.slices
            lasts_s = min(lasts_s, (float(index) + 1) * slice_s - account_now)
        credit = self._credit = _Credit(
            binding, indexes, demand.requests, start_s + lasts_s, (account_now, now.mono)
        )
        if lasts_s <= 0 or epoch != self._credit_epoch or self._closed:
            self._end_credit(now)  # nothing may come from it
            return
        loop = self._link.loop
        if loop is not None:
            delay_s = credit.until - self._credit_clock(now) if self._server_time else lasts_s
            credit.handle = loop.call_later(max(delay_s, 0.0), self._credit_over, credit)

    def _from_credit(self, credit: _Credit, demand: Demand) -> RedisGrant:
        """An admission of `demand` from `credit`, which has room for it."""
        credit.left -= demand.requests
        credit.used += demand.requests
        grant = RedisGrant(credit.binding, demand, NO_LEASE, credit.indexes)
        grant.admitted = credit.admitted
        grant.credit = credit
        return grant

    def _credit_over(self, credit: _Credit) -> None:
        """`credit`'s time is up (its timer): the next asks for as much as it used."""
        if self._credit is credit:
            self._credit_size = credit.used
            self._end_credit(None)

    def _stop_credits(self, now: Instant | None, *, pause: bool = False) -> None:
        """End the credit, and one on its way when it comes (refunded then); after a
        pause the next is drawn only as calls come again."""
        self._credit_epoch += 1
        if pause:
            self._credit_size = 0.0
        self._end_credit(now)

    def _end_credit(self, now: Instant | None) -> None:
        """End the credit: what is left of it is refunded (posted, so that it goes out
        before anything sent after), and admissions no longer come from it."""
        credit = self._credit
        if credit is None:
            return
        self._credit = None
        if credit.handle is not None:
            credit.handle.cancel()
        if credit.left > 0:
            command = self._settle_command(
                credit.binding,
                NO_LEASE,
                Demand(credit.left, 0.0, 0.0),
                credit.indexes,
                None,
                now,
            )
            credit.left = 0.0
            self._post_settle(NO_LEASE, command, None)

    async def settle(
        self, limits: Limits, grant: Grant, actual: Demand | None, now: Instant
    ) -> None:
        """Record the call's real usage (None: it never reached the provider, hand all
        back) and free its slot. Only the first settle of a grant counts.

        The settle is queued, not awaited (`_post_settle`): the caller goes on at once,
        and its next reserve goes out behind the settle, in the same round trip when
        both wait for the same sender. While Redis is down it is kept and sent when
        Redis answers again; the slot comes back then, or when its lease lapses.
        """
        self.abandon(limits, grant, actual, now)

    async def drain(self) -> None:
        """Wait until every settle this process posted so far is answered by Redis (or
        kept for later, while Redis is down): what another client reads after it counts
        them. A statistics snapshot does this by itself; `aclose` sends what is left.
        A credit this process drew ends first (what is left of it is refunded)."""
        self._stop_credits(None)
        await self._link.posted_answered()

    async def restamp(self, limits: Limits, grant: Grant, now: Instant) -> None:
        """The call of `grant` left the process now: what it recorded at its admission
        counts from now. A round trip only when the account's clock has entered a later
        slice of some window since the admission (estimated from this process's clock);
        else nothing is sent. Cancelling it, or Redis failing, leaves the admission as
        it was (the margin is then all there is)."""
        assert isinstance(grant, RedisGrant), "a grant of another backend"
        if grant.settled or not self._enter(now, settling=True):
            return
        if grant.local is not None:
            self._fallback.restamp_now(grant.local, now.mono)
            return
        binding = grant.binding
        if binding is None or not self._slices_passed(grant, now.mono):
            grant.sent = True  # still in the admission's slices: counted from there
            return
        wall = self._wall(now)
        keys = binding.keys
        args = [
            self._clock_arg(now),
            binding.key_ttl_text,
            grant.lease_id,
            binding.specs(wall, self._binding),
            _amounts(grant.demand),
            " ".join(grant.indexes),
            self._account_instant(grant, now),
        ]
        tenant = grant.tenant
        if tenant is not None:
            keys = [*keys, *tenant.keys]
            args += [*tenant.binding.tenant_args(wall), " ".join(tenant.indexes)]
        command = SENT.evalsha(keys, args)
        try:
            reply = await self._link.call(command, SENT, abortable=True)
        except Exception as exc:
            # The request is on its way: the admission stands as it was (counted from its
            # admission, the margin covering the rest), never an error for the caller.
            if _is_outage(exc):
                self._link.mark_down(exc)
            else:
                _log.warning("ratekit could not restamp an admission on Redis: %r", exc)
            return
        if not grant.settled:
            grant.sent = True
            indexes = [_text(index) for index in reply]
            windows = len(binding.rates)
            grant.indexes = indexes[:windows]
            if tenant is not None:
                tenant.indexes = indexes[windows:]

    @staticmethod
    def _account_instant(grant: RedisGrant, now: Instant) -> str:
        """`now` on the account's clock as this process reckons it from the grant's
        admission, for sent.lua and settle.lua ("": unknown, the script's own now)."""
        account_s, local_s = grant.admitted
        return "" if math.isnan(account_s) else repr(account_s + (now.mono - local_s))

    @staticmethod
    def _slices_passed(grant: RedisGrant, now_s: float) -> bool:
        """Whether the account's clock is now (`now_s` on the limiter's clock) in a later
        slice than the admission's of some rolling window."""
        account_s, local_s = grant.admitted
        if math.isnan(account_s):
            return True
        binding = grant.binding
        assert binding is not None
        estimate_s = account_s + (now_s - local_s)
        pairs = zip(binding.rates, grant.indexes, strict=True)
        tenant = grant.tenant
        if tenant is not None:
            own = zip(tenant.binding.rates, tenant.indexes, strict=True)
            pairs = itertools.chain(pairs, own)  # type: ignore[assignment]
        for rate, index in pairs:
            if rate.calendar_tz:
                continue
            if math.floor(estimate_s / (rate.period_s / rate.slices)) > float(index):
                return True
        return False

    def abandon(self, limits: Limits, grant: Grant, actual: Demand | None, now: Instant) -> None:
        """Settle a grant at once, its settle posted (as `settle` does: the limiter ends
        every grant of this backend here, see `settles_here`, and a grant its holder
        dropped too): its lease is no longer renewed from now on, and the settle is sent
        (or kept while Redis is down). On the backend's event loop, never from a
        finalizer."""
        assert isinstance(grant, RedisGrant), "a grant of another backend"
        if not self._enter(now, settling=True):
            return
        self._bind(limits)  # the limits in force: the settle runs under them
        command = self._end(grant, actual, now)
        if command is not None:
            self._post_settle(grant.lease_id, command, grant.tenant)

    def settles_here(self, grant: Grant, actual: Demand | None) -> bool:
        """True: no settle of this backend waits for Redis. One that sends something
        posts it (see `settle`), the others send nothing (`_end`)."""
        assert isinstance(grant, RedisGrant), "a grant of another backend"
        return True

    def _end(
        self, grant: RedisGrant, actual: Demand | None, now: Instant
    ) -> tuple[str, ...] | None:
        """Mark `grant` settled; the settle to send to Redis, if there is one."""
        if grant.settled:
            return None
        grant.settled = True
        if grant.local is not None:
            self._fallback.settle_now(grant.local, actual, now.mono, now.wall)
            return None
        binding = grant.binding
        if binding is None:  # admitted while failing open: nothing was counted
            return None
        credit = grant.credit
        if (
            actual is None
            and credit is not None
            and credit is self._credit
            and grant.indexes is credit.indexes
            and self._credit_clock(now) < credit.until
        ):
            # Refunded while its credit lasts: given back to the credit.
            credit.left += grant.demand.requests
            credit.used -= grant.demand.requests
            return None
        left = "-"
        if actual is not None and not grant.sent and self._slices_passed(grant, now.mono):
            # Never said to leave, and ended in a later slice: counted from its end.
            left = self._account_instant(grant, now)
        elif grant.lease_id == NO_LEASE and actual is not None:
            return None  # only requests were counted, and the call was sent: all final
        self._live.pop(grant.lease_id, None)
        return self._settle_command(
            binding, grant.lease_id, grant.demand, grant.indexes, actual, now, grant.tenant, left
        )

    def _settle_command(
        self,
        binding: _Binding,
        lease_id: str,
        demand: Demand,
        indexes: list[str],
        actual: Demand | None,
        now: Instant | None,
        tenant: _TenantPart | None = None,
        left: str = "-",
    ) -> tuple[str, ...]:
        """The SETTLE of an admission made under `binding` (and of its `tenant`'s part),
        under the limits in force; `left` is settle.lua's ARGV[11]."""
        real = actual if actual is not None else demand
        wall = self._wall(now)
        keys = binding.keys
        args = [
            self._clock_arg(now),
            binding.key_ttl_text,
            lease_id,
            self._channel,
            "1" if actual is None else "0",
            binding.specs(wall, self._binding),
            _amounts(demand),
            _amounts(real),
            " ".join(indexes),
            "" if actual is None or math.isnan(actual.counted) else repr(actual.counted),
            left,
        ]
        if tenant is not None:
            keys = [*keys, *tenant.keys]
            args += [*tenant.binding.tenant_args(wall), " ".join(tenant.indexes), tenant.name]
        return SETTLE.evalsha(keys, args)

    def _post_settle(
        self, lease_id: str, command: tuple[str, ...], tenant: _TenantPart | None
    ) -> None:
        """Send a settle nobody awaits (the one way every settle and refund of this
        backend goes out): queued behind what waits to be sent, kept for later while
        Redis is down."""
        link = self._link
        if not link.post(command, SETTLE, partial(self._settled, lease_id, command, tenant)):
            link.defer(lease_id, command, SETTLE)

    def _settled(
        self,
        lease_id: str,
        command: tuple[str, ...],
        tenant: _TenantPart | None,
        future: asyncio.Future[Any],
    ) -> None:
        """A posted settle's reply: its tenant's callers here retry; kept if Redis was
        down; any other failure is logged (its lease lapses on its own)."""
        if future.cancelled():
            return
        exc = future.exception()
        link = self._link
        if exc is None:
            link.mark_up()
            # This process's waiters retry now, whether or not the notice reaches them.
            self._listeners.notify()
            if tenant is not None:
                # Its tenant's callers here retry now, whether or not the notice reaches them.
                self._tenant_listeners.notify(tenant.name)
        elif _is_outage(exc):
            link.mark_down(exc)
            link.defer(lease_id, command, SETTLE)
        else:
            _log.warning(
                "a settle Redis refused (%r): its lease lapses on its own: %r", lease_id, exc
            )

    def _refund_orphan(
        self,
        binding: _Binding,
        demands: Sequence[Demand],
        lease_ids: list[str],
        future: asyncio.Future[Any],
        parts: Sequence[_TenantPart | None] | None = None,
    ) -> None:
        """A reserve whose caller left got its reply: hand back grants nobody holds (and
        their tenants' parts)."""
        if future.cancelled() or future.exception() is not None:
            # Unsent, or lost on the way: if the script ran, the leases it took are
            # released once Redis answers (`_release_unknown`), and what it counted at
            # admission stays counted. With tenants, they lapse on their own.
            if not future.cancelled() and not _unsent(future.exception()) and parts is None:
                self._release_unknown(binding, demands, lease_ids)
            self._link.orphan(future)
            return
        reply = future.result()
        self._link.mark_up()
        admitted, _ = self._admitted(binding, parts, reply)
        for j, (indexes, part) in enumerate(admitted):
            if indexes and indexes[0] == "-":
                continue  # a credit the script skipped
            lease_id = NO_LEASE if lease_ids[j] == _CREDIT_LEASE else lease_ids[j]
            command = self._settle_command(binding, lease_id, demands[j], indexes, None, None, part)
            self._post_settle(lease_id, command, part)

    def _release_unknown(
        self, binding: _Binding, demands: Sequence[Demand], lease_ids: list[str]
    ) -> None:
        """A reserve's round trip was lost after it may have reached the server (a server
        that stalled, then ran what it had read): free the slots and holds of the leases
        it may have taken, once Redis answers, so that they do not stay taken until they
        lapse. A refund of what the lease holds only: what the script counted at
        admission (requests; tokens counted at arrival) stays counted, since the slice it
        landed in is not known. A lease the script never took makes it do nothing."""
        # A unit counted at admission is left out (its refund needs the slice), one held
        # until settle is freed with the lease.
        recorded = {
            UNIT_POSITION[rate.unit]
            for rate in binding.rates
            if take_kind(rate, binding.limits.token_counting) == RECORDED
        }
        indexes = ["0"] * len(binding.rates)
        for lease_id, demand in zip(lease_ids, demands, strict=True):
            if lease_id in (NO_LEASE, _CREDIT_LEASE):
                continue
            held = tuple.__new__(
                Demand,
                (*(0 if i in recorded else demand[i] for i in range(3)), demand.counted),
            )
            command = self._settle_command(binding, lease_id, held, indexes, None, None)
            self._post_settle(lease_id, command, None)

    async def _read_stats(self, command: Any, now: Instant) -> Any:
        """The reply of a stats script; `BackendUnavailableError` while Redis is down (a
        snapshot has no fallback: this process's counts alone would mislead). The settles
        this process posted before are answered first, so that the snapshot counts them."""
        link = self._link
        await link.posted_answered()
        try:
            reply = await link.call(command, STATS, abortable=True)
        except Exception as exc:
            if not _is_outage(exc):
                raise
            link.mark_down(exc)
            raise self._unavailable_error(self._outage_age_s(now.mono)) from None
        link.mark_up()
        return reply

    async def statistics(self, limits: Limits, now: Instant) -> tuple[DimensionStatistics, ...]:
        """Usage of every dimension now; `BackendUnavailableError` while Redis is down."""
        self._enter(now)
        binding = self._bind(limits)
        self._stop_credits(now)  # counted exactly
        command = STATS.evalsha(
            binding.keys,
            [self._clock_arg(now), str(binding.key_ttl_ms), binding.specs(self._wall(now))],
        )
        reply = await self._read_stats(command, now)
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

    async def pause(self, seconds: float, now: Instant, *, out: bool = False) -> float:
        """Refuse every admission of the account for `seconds` (at most 1e7) from now;
        while Redis is down, in this process only."""
        self._enter(now)
        if isinstance(seconds, bool) or not isinstance(seconds, int | float):
            raise InvalidArgumentError(
                f"RedisBackend.pause: seconds must be a number, got {seconds!r}"
            )
        if not 0 <= seconds <= _MAX_PAUSE_S:
            raise InvalidArgumentError(
                f"RedisBackend.pause: seconds must be in [0, {_MAX_PAUSE_S:g}], got {seconds!r}"
            )
        link = self._link
        # Admissions stop here at once (and, told on the channel, in every process).
        self._stop_credits(now, pause=True)
        command = PAUSE.evalsha(
            _account_keys(self._prefix),
            [
                self._clock_arg(now),
                str(self._key_ttl_ms()),
                repr(float(seconds)),
                "1" if out else "0",
                self._channel,
            ],
        )
        try:
            reply = await link.call(command, PAUSE, abortable=True)
        except Exception as exc:
            if not _is_outage(exc):
                raise
            link.mark_down(exc)
            return self._fallback.pause_now(float(seconds), now.mono, out=out)
        link.mark_up()
        return float(reply)

    async def tenant_statistics(
        self, limits: Limits, tenant: TenantShare, now: Instant
    ) -> tuple[DimensionStatistics, ...]:
        """Usage of `tenant`'s own dimensions now (concurrency first when capped), over
        every process of the account; `BackendUnavailableError` while Redis is down."""
        self._enter(now)
        binding = self._bind(limits)
        part = self._tenant_part(tenant)
        assert part is not None
        wall = self._wall(now)
        command = STATS.evalsha(
            [*binding.keys, *part.keys],
            [
                self._clock_arg(now),
                str(binding.key_ttl_ms),
                binding.specs(wall),
                *part.binding.tenant_args(wall),
            ],
        )
        reply = await self._read_stats(command, now)
        at = 1 + 2 * len(binding.rates)
        in_flight = int(reply[at])
        own = part.binding.limits
        stats = []
        if own.concurrency is not None:
            stats.append(
                DimensionStatistics("concurrency", "slots", own.concurrency, in_flight, in_flight)
            )
        for number, rate in enumerate(part.binding.rates):
            used, held = float(reply[at + 1 + 2 * number]), float(reply[at + 2 + 2 * number])
            stats.append(DimensionStatistics(rate.name, rate.unit, rate.limit, used, held))
        return tuple(stats)

    def subscribe_tenants(self, listener: Callable[[str], None]) -> Callable[[], None]:
        """Call `listener(tenant)` when a call of `tenant` (with limits of its own) ended,
        in this process or, by the release notice, in another."""
        return self._listen(self._tenant_listeners.add(listener))

    def check_tenant_limits(self) -> None:
        """Tenant limits are kept under the root account's hash tag: a child (a model with
        limits of its own) on a Redis Cluster has its keys in another slot, where no
        script can take both at once."""
        if not self._is_root and isinstance(self._link.client, RedisCluster):
            raise InvalidArgumentError(
                f"RedisBackend: tenant limits cannot be kept with namespace "
                f"{self.namespace!r} on a Redis Cluster: its keys are in another slot than "
                "its account's tenants; use one Redis server (or Sentinel) for tenants with "
                "limits of their own and models with limits of their own"
            )

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call `listener` on each release announced for the account (and once when the
        announcements start to be heard: a release just before was not)."""
        return self._listen(self._listeners.add(listener))

    def _listen(self, unsubscribe: Callable[[], None]) -> Callable[[], None]:
        """A listener was added: start hearing release notices now when on the backend's
        loop (else at its first call); `unsubscribe` is handed back."""
        loop = self._link.loop
        if loop is not None and not loop.is_closed() and _running_loop() is loop:
            self._start(renew=False)
        return unsubscribe

    def _key_ttl_ms(self) -> int:
        """The ttl of the account's keys (ms), as the limits seen last set it."""
        if self._binding is not None:
            return self._binding.key_ttl_ms
        return math.ceil(self._lease_ttl_s * 2000)

    # -- the SharedAccount protocol ----------------------------------------------------

    def child(self, name: str) -> RedisBackend:
        """A backend for limits of their own (a model's) within this account.

        Same server, client, event loop and policy; namespace ``<namespace>.<name>``.
        Closed with this one.
        """
        name = _check_name("child name", name)
        backend = RedisBackend.__new__(RedisBackend)
        backend._setup(
            self._link,
            f"{self.namespace}.{name}",
            self._prefix_root,
            self._lease_ttl_s,
            self._policy,
            self._outage_wait_s,
            self._local_share,
            self._server_time,
            self._credits,
        )
        backend._is_root = False
        backend._tenant_prefix = self._tenant_prefix
        self._children.append(backend)
        return backend

    async def publish_tier(self, tier: str) -> None:
        """Tell every pod of the account that it is now on `tier` (and remember it).

        While Redis is down: `BackendUnavailableError` when failing closed;
        otherwise it is sent once Redis answers again (a warning says so).
        """
        self._enter()
        link = self._link
        remember = ("SET", f"{self._prefix}:tier", tier)
        announce = ("PUBLISH", self._channel, f"tier:{tier}")
        try:
            await link.call(remember, abortable=True)
            await link.call(announce, abortable=True)
        except Exception as exc:
            if not _is_outage(exc):
                raise
            link.mark_down(exc)
            if self._policy == "fail_closed":
                raise self._unavailable_error() from None
            _log.warning(
                "Redis at %s is unreachable: tier %r of namespace %r is published once it "
                "answers again",
                link.where,
                tier,
                self.namespace,
            )
            link.defer(("tier", self._prefix), remember, None)
            link.defer(("tier notice", self._prefix), announce, None)
            return
        link.mark_up()

    async def shared_tier(self) -> str | None:
        """The tier the account's pods last agreed on, if any was published.

        While Redis is down: `BackendUnavailableError`, under any policy (what the pods
        agreed on is not known; a scheduler asks again at its next call).
        """
        self._enter()
        return await self._stored_tier()

    async def _stored_tier(self) -> str | None:
        """`shared_tier`'s read (also the listener's, see `_recall_tier`)."""
        link = self._link
        try:
            value = await link.call(("GET", f"{self._prefix}:tier"), abortable=True)
        except Exception as exc:
            if not _is_outage(exc):
                raise
            link.mark_down(exc)
            raise self._unavailable_error() from None
        link.mark_up()
        return None if value is None else _text(value)

    def on_tier(self, callback: Callable[[str], None]) -> None:
        """Call `callback(tier)` when another pod publishes a tier change."""
        self._tier_callbacks.append(callback)

    def share_estimates(
        self, factors: Mapping[str, float], on_fleet: Callable[[dict[str, float]], None]
    ) -> None:
        """Send this pod's learned token-estimate factors (by model; none: only ask) in
        the background; `on_fleet` gets the largest fresh factor of each model over the
        account's pods (a pod's factor stays fresh `_ESTIMATES_FRESH_S` after it last
        sent it). One EVALSHA; nothing while Redis is down, before the backend's first
        use, or after `aclose`."""
        if self._closed or self._link.closing or self._link.loop is None:
            return
        pairs = [item for model, factor in factors.items() for item in (model, repr(factor))]
        command = ESTIMATES.evalsha(
            [f"{self._prefix}:estimates"],
            [self._instance, repr(_ESTIMATES_FRESH_S), *pairs],
        )

        async def send() -> None:
            try:
                reply = await self._link.call(command, ESTIMATES, abortable=True)
            except Exception as exc:
                if _is_outage(exc):
                    return  # the pod's own factors stand; sent again on the next change
                raise
            fleet = {}
            for i in range(0, len(reply) - 1, 2):
                with contextlib.suppress(ValueError):
                    fleet[_text(reply[i])] = float(reply[i + 1])
            on_fleet(fleet)

        self._link.spawn(send())

    # -- background: lease renewal and release notices ----------------------------------

    def _start(self, *, renew: bool) -> None:
        if self._link.closing:
            return
        if renew and (self._renewer is None or self._renewer.done()):
            self._renewer = self._link.spawn(self._renew_loop())
        wanted = (
            self._listeners or self._tier_callbacks or self._tenant_listeners or self._credit_listen
        )
        if wanted and (self._subscriber is None or self._subscriber.done()):
            self._subscriber = self._link.spawn(self._listen_loop())

    def _leases_to_renew(self) -> list[tuple[_Binding, list[str], list[str], list[str]]]:
        """The leases of grants still held, by binding: the binding, its lease ids, and
        the keys and arguments of the tenants among them (see renew.lua); forgets dropped
        and settled ones."""
        by_binding: dict[int, tuple[_Binding, list[str], dict[str, list[str]]]] = {}
        tenants: dict[str, _TenantPart] = {}
        for lease_id, (ref, binding) in list(self._live.items()):
            grant = ref()
            if grant is None or grant.settled:
                # Dropped without a settle: no longer renewed, its lease lapses.
                del self._live[lease_id]
                continue
            _, lease_ids, by_tenant = by_binding.setdefault(id(binding), (binding, [], {}))
            lease_ids.append(lease_id)
            tenant = grant.tenant
            if tenant is not None and not tenant.binding.leaseless:
                tenants[tenant.name] = tenant
                by_tenant.setdefault(tenant.name, []).append(lease_id)
        renewals = []
        for binding, lease_ids, by_tenant in by_binding.values():
            keys = list(binding.keys)
            args = []
            for name, own in by_tenant.items():
                tenant = tenants[name]
                keys.extend(tenant.keys)
                args.append(" ".join([str(tenant.binding.key_ttl_ms), *own]))
            renewals.append((binding, lease_ids, keys, args))
        return renewals

    async def _renew_loop(self) -> None:
        # Stays for two idle rounds after the last lease, so that short calls do not
        # start a renewer each.
        link = self._link
        idle_rounds = 0
        while idle_rounds < 2 and not link.closing:
            await asyncio.sleep(self._lease_ttl_s / 3)
            idle_rounds = 0 if await self._renew() else idle_rounds + 1

    async def _renew(self) -> bool:
        """Renew the leases of grants still held, once (see renew.lua); whether there
        were any. A failure is logged (an outage marks the link down), not raised."""
        link = self._link
        leases = self._leases_to_renew()
        for binding, lease_ids, keys, tenant_args in leases:
            _raise_if_cancelled()
            command = RENEW.evalsha(
                keys,
                [
                    self._clock_arg(),
                    str(binding.key_ttl_ms),
                    repr(self._lease_ttl_s),
                    *tenant_args,
                    *lease_ids,
                ],
            )
            try:
                await link.call(command, RENEW, abortable=False)
            except Exception as exc:
                if _is_outage(exc):
                    link.mark_down(exc)
                else:
                    _log.warning("renewing %d Redis leases failed: %r", len(lease_ids), exc)
            else:
                link.mark_up()
        return bool(leases)

    async def _listen_loop(self) -> None:
        link = self._link
        while (
            self._listeners or self._tier_callbacks or self._tenant_listeners or self._credit_listen
        ) and not link.closing:
            pubsub = link.client.pubsub()
            try:
                async with asyncio.timeout(link.command_timeout_s):
                    # The channel as the scripts publish on it (ratekit packs its commands
                    # as UTF-8, whatever the client's encoding).
                    await pubsub.subscribe(self._channel.encode())
                link.mark_up()  # the server answered
                # Heard from now on; a release announced before was not: every waiter
                # tries once more. A pause announced before was not heard either: a
                # credit drawn before ends (none is drawn while nothing is heard).
                self._hearing = True
                self._stop_credits(None)
                self._listeners.notify()
                if self._tier_callbacks:
                    # A tier published before the channel was heard was not: the stored
                    # one is read now (a change after it comes as a notice).
                    await self._recall_tier()
                while not link.closing:
                    _raise_if_cancelled()
                    # A bounded wait, so that closing never depends on a message.
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_LISTEN_POLL_S
                    )
                    if message is not None and message.get("type") == "message":
                        self._dispatch(link.utf8(message.get("data", b"")))
            except Exception as exc:
                self._hearing = False
                if not _is_outage(exc) and not isinstance(exc, MaxConnectionsError):
                    _log.warning("the Redis release listener failed: %r", exc)
                await asyncio.sleep(_BACKOFF_S[-1])
            finally:
                self._hearing = False
                try:
                    async with asyncio.timeout(1.0):
                        # Typed through a Callable: redis-py's releases differ in whether
                        # aclose is annotated, and mypy must pass with either.
                        close: Callable[[], Awaitable[None]] = pubsub.aclose
                        await asyncio.shield(close())
                except Exception:  # best effort: the connection goes either way
                    pass

    async def _recall_tier(self) -> None:
        """Tell the tier callbacks the tier stored for the account, if any (nothing while
        Redis is down: the listener subscribes again, and reads it then)."""
        try:
            tier = await self._stored_tier()
        except BackendUnavailableError:
            return
        if tier is not None:
            self._dispatch(f"tier:{tier}")

    def _dispatch(self, data: str) -> None:
        """A notice on the account's channel: a tier published, a pause (pause.lua: this
        process's credit ends at once), or a release ("<lease>", or "<lease>\n<tenant>"
        for a call of a tenant with limits of its own)."""
        try:
            if data == _PAUSE_NOTICE:
                self._stop_credits(None, pause=True)
            elif data.startswith("tier:"):
                for callback in list(self._tier_callbacks):
                    callback(data[len("tier:") :])
            else:
                self._listeners.notify()
                _, tenant, name = data.partition("\n")
                if tenant:
                    self._tenant_listeners.notify(name)
        except Exception:
            # Someone else's callback: logged, and the listener goes on listening.
            _log.exception("a callback of a Redis notice failed (%r)", data)

    async def aclose(self) -> None:
        """Stop the background work (within a few seconds), sending settles still on
        their way, and close the client if it was built from a URL.

        Raises an `ExceptionGroup` of background failures nothing else reported.
        """
        if self._closed:
            return
        self._closed = True
        link = self._link
        if link.loop is None or link.loop.is_closed():
            # Never used, or its loop is gone (and its connections with it).
            if self._is_root:
                link.closing = link.closed = True
                if link.loop is None and link.owns_client:
                    await link.client.aclose()
            return
        link.enter(self)
        self._stop_credits(None)  # its refund goes with the settles still on their way
        for child in self._children:
            await child.aclose()
        for task in (self._renewer, self._subscriber):
            if task is not None:
                task.cancel()
        if not self._is_root:
            return
        await link.aclose()
        if link.errors:
            errors, link.errors = link.errors, []
            raise ExceptionGroup("ratekit's Redis background work failed", errors)

    # -- Redis unreachable ----------------------------------------------------------------

    def _unavailable_error(self, down_s: float = 0.0) -> BackendUnavailableError:
        link = self._link
        return BackendUnavailableError(
            f"redis at {link.where} is unreachable ({link.last_error}, for {down_s:.1f} s); "
            f"namespace {self.namespace!r}, policy {self._policy}"
        )

    def _outage_age_s(self, now_s: float) -> float:
        """Seconds of the link's current outage that this backend has seen, on its
        limiters' clock (`now_s`: the instant handed in): from its first call that
        met the outage."""
        outage = self._link.outage
        seen = self._outage_seen
        if seen is None or seen[0] != outage:
            seen = self._outage_seen = (outage, now_s)
        return max(0.0, now_s - seen[1])

    def _reserve_many_unavailable(
        self, limits: Limits, demands: Sequence[Demand], now: Instant
    ) -> tuple[list[Grant], Refusal | None]:
        grants: list[Grant] = []
        for demand in demands:
            outcome = self._reserve_unavailable(limits, demand, now)
            if isinstance(outcome, Refusal):
                return grants, outcome
            grants.append(outcome)
        return grants, None

    def _reserve_unavailable(self, limits: Limits, demand: Demand, now: Instant) -> Grant | Refusal:
        if self._policy == "fail_closed":
            # An outage shorter than `outage_wait_s` (a restart, a failover) is waited
            # out: the caller is refused as for capacity and asks again once the backoff
            # ends; past it, every caller gets the error.
            down_s = self._outage_age_s(now.mono)
            left_s = self._outage_wait_s - down_s
            if left_s <= 0 or self._link.refused:
                raise self._unavailable_error(down_s)
            clock = time.monotonic()
            wait_s = min(max(self._link.retry_at - clock, _OUTAGE_RETRY_S), left_s)
            return Refusal(wait_s, UNAVAILABLE)
        if self._policy == "fail_open":
            return RedisGrant(None, demand, "", [])
        local_limits = self._local_limits(limits)
        outcome = self._fallback.reserve_now(local_limits, demand, now.mono, now.wall)
        if isinstance(outcome, Refusal):
            # Redis may be back before the local hint: retry no later than the backoff.
            wait_s = min(outcome.wait_s, max(self._link.retry_at - time.monotonic(), 0.0))
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


_URL_SCHEMES = ("redis", "rediss", "unix")


def _check_url(url: str) -> str:
    """`url` as a Redis URL to connect to, redacted for messages; `InvalidArgumentError`
    naming what is wrong (never the password) when it is not one."""
    example = "redis://host:6379/0"
    try:
        parts = urlsplit(url.strip())
        port = parts.port  # reads it: a port that is not a number raises here
    except ValueError as error:
        raise InvalidArgumentError(
            f"RedisBackend.redis: not a Redis URL ({error}); expected {example}"
        ) from None
    if parts.scheme not in _URL_SCHEMES:
        shown = f"{parts.scheme}://" if parts.scheme else repr(url[:40]) if url else "''"
        raise InvalidArgumentError(
            f"RedisBackend.redis: {shown} is not a Redis URL; expected {example} "
            f"(schemes: {', '.join(f'{scheme}://' for scheme in _URL_SCHEMES)})"
        )
    where = _redacted(url.strip())
    if parts.scheme == "unix":
        if not parts.path:
            raise InvalidArgumentError(
                "RedisBackend.redis: unix:// names no socket; expected unix:///path/to.sock"
            )
        return where
    if not parts.hostname:
        raise InvalidArgumentError(
            f"RedisBackend.redis: {parts.scheme}:// names no host; expected {example}"
        )
    if port == 0:
        raise InvalidArgumentError(f"RedisBackend.redis: {where} has port 0")
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise InvalidArgumentError(
            f"RedisBackend.redis: {where}: the database after the host must be a number "
            f"(/0 to /15 on a default server), got /{db}"
        )
    return where


def _redacted(url: str) -> str:
    """`url` without its user name or password."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = f":{parts.port}" if parts.port else ""
    path = parts.path if parts.path not in ("", "/") else ""
    return f"{parts.scheme}://{host}{port}{path}"


def _describe(client: Client) -> str:
    if isinstance(client, RedisCluster):
        nodes = list(client.nodes_manager.startup_nodes.values())
        return f"redis cluster at {nodes[0].host}:{nodes[0].port}" if nodes else "redis cluster"
    pool = client.connection_pool
    service = getattr(pool, "service_name", None)
    if isinstance(service, str):
        # A Sentinel-managed pool: its primary moves, and its connection_kwargs hold no
        # address (redis-py's defaults, localhost:6379, would be shown).
        manager = getattr(pool, "sentinel_manager", None)
        sentinels = [
            "{}:{}".format(
                sentinel.connection_pool.connection_kwargs.get("host", "localhost"),
                sentinel.connection_pool.connection_kwargs.get("port", 26379),
            )
            for sentinel in getattr(manager, "sentinels", ())
        ]
        return f"sentinel service {service!r} ({', '.join(sentinels) or 'no sentinels'})"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
    return f"redis://{host}:{port}/{kwargs.get('db', 0)}"
