"""The workload driver: many tasks making calls through ratekit, and what they came to.

Every workload of ratekit's tests, benchmarks and command line runs here:

- `drive` is the one loop: `calls` calls (or calls until a deadline) from `tasks`
  tasks, each call an awaitable function of its index; it counts results and
  errors into an `Outcome`.
- `Workload` says, in JSON-able fields, what one run sends and how: how calls meet
  ratekit (a `Limiter`, `Scheduler.submit` or a `wrap`ped SDK client), the account,
  the requests, the provider's URL and the backend (memory, or Redis to share the
  account). `Driver` runs one in this process: ``async with Driver(workload) as
  driver: outcome = await driver.run()``.
- `Fleet` runs one as N processes (``python -m ratekit.testing.workload '<json>'``,
  each a `Driver` on its share of the calls), released together, and returns one
  `Outcome` per process.
- `steady_utilisation` and `binding_utilisation` measure how much of a limit a run
  used, as the provider saw it.

Runs on asyncio (the SDK clients, redis-py and the mock provider do). The ``openai``
or ``anthropic`` package is needed only for a workload that sends to a provider.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import importlib
import json
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import IO, Any, Literal

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

from .._account import Account
from .._admission import Admission
from .._errors import AcquireTimeout
from .._events import Event
from .._limiter import Limiter
from .._limits import Limits
from .._pool import Member, Pool
from .._scheduler import Scheduler
from ..backends import Backend, MemoryBackend

Through = Literal["limiter", "submit", "wrap"]
Api = Literal["openai", "anthropic"]

# How long a call counts beyond its slice on the client: it must cover the wait between
# an admission and the request's arrival at the provider. Measured on 2 shared cores
# with client and provider on one machine: 5-15 ms typically, spikes to ~90 ms.
MARGIN_S = 0.1
# How long after the start signal a fleet's account opens: every member's tasks are
# queued behind a pause by then, as they are after a cooldown.
START_PAUSE_S = 0.1
# The loop-lag probe's period.
_TICK_S = 0.01
# What a fleet member runs (``python -m``).
_MEMBER = "ratekit.testing.workload"


class StopTask(Exception):
    """Raised by a call to end its task without an error (its run's deadline came)."""


class WorkloadError(RuntimeError):
    """A fleet member did not start, failed, or did not answer in time."""


# -- the outcome ----------------------------------------------------------------------


@dataclass
class Outcome:
    """What one run of calls came to.

    `results` counts the calls that returned, `errors` the reprs of those that
    raised, `events` the scheduler's events by type. `admissions` holds, for a
    limiter workload, each admission's ``(granted, released, slice)``: wall-clock
    instants read right after the grant and right before the release (so each lies
    inside the server's own hold) and the first rate's slice index on a Redis
    server's clock (NaN elsewhere). `started_at` is the wall-clock instant the
    account opened, `elapsed_s` the time from then to the last call's end,
    `max_lag_s` how late the event loop ran at worst, `factors` the scheduler's
    shares of the tier's limits at the end (each group's).
    """

    results: int = 0
    errors: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    admissions: list[tuple[float, float, float]] = field(default_factory=list)
    started_at: float = math.nan
    elapsed_s: float = math.nan
    max_lag_s: float = 0.0
    factors: dict[str, float] = field(default_factory=dict)

    def record(self, event: Event) -> None:
        """A scheduler hook: count the event by its type's name."""
        self.events[type(event).__name__] += 1

    @property
    def rate_limited(self) -> int:
        """429s the client saw (the scheduler's `RateLimited` events)."""
        return self.events["RateLimited"]

    def as_json(self) -> dict[str, Any]:
        return {
            "results": self.results,
            "errors": self.errors,
            "events": dict(self.events),
            "admissions": self.admissions,
            "started_at": self.started_at,
            "elapsed_s": self.elapsed_s,
            "max_lag_s": self.max_lag_s,
            "factors": self.factors,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Outcome:
        return cls(
            results=data["results"],
            errors=list(data["errors"]),
            events=Counter(data["events"]),
            admissions=[(a[0], a[1], a[2]) for a in data["admissions"]],
            started_at=data["started_at"],
            elapsed_s=data["elapsed_s"],
            max_lag_s=data["max_lag_s"],
            factors=dict(data["factors"]),
        )

    @classmethod
    def merged(cls, outcomes: Sequence[Outcome]) -> Outcome:
        """Several processes' outcomes as one: counts added, the earliest start, the
        latest end, the worst lag, each group's lowest factor."""
        total = cls()
        for outcome in outcomes:
            total.results += outcome.results
            total.errors += outcome.errors
            total.events += outcome.events
            total.admissions += outcome.admissions
            total.max_lag_s = max(total.max_lag_s, outcome.max_lag_s)
            for group, factor in outcome.factors.items():
                total.factors[group] = min(factor, total.factors.get(group, factor))
        if outcomes:
            total.started_at = min(o.started_at for o in outcomes)
            total.elapsed_s = max(o.started_at + o.elapsed_s for o in outcomes) - total.started_at
        return total


# -- the loop -------------------------------------------------------------------------


async def drive(
    call: Callable[[int], Awaitable[object]],
    *,
    calls: int | None,
    tasks: int,
    outcome: Outcome | None = None,
    until: float | None = None,
    failures: tuple[type[BaseException], ...] = (Exception,),
) -> Outcome:
    """Make calls ``call(0), call(1), ...`` from `tasks` tasks, each taking the next index.

    Stops after `calls` calls (None: no count) and, with `until` (a ``time.time()``
    instant), starts no call after it. A call that returns counts in
    ``outcome.results``; one that raises one of `failures` is recorded in
    ``outcome.errors`` and its task goes on; `StopTask` ends its task; anything else
    propagates. Returns `outcome` (a new one if none is given).
    """
    if calls is None and until is None:
        raise ValueError("drive: give calls, until, or both")
    outcome = Outcome() if outcome is None else outcome
    taken = 0

    async def worker() -> None:
        nonlocal taken
        while (calls is None or taken < calls) and (until is None or time.time() < until):
            index, taken = taken, taken + 1
            try:
                await call(index)
            except StopTask:
                return
            except failures as exc:  # every lost call is reported, not raised
                outcome.errors.append(repr(exc))
            else:
                outcome.results += 1

    async with anyio.create_task_group() as group:
        for _ in range(tasks):
            group.start_soon(worker)
    return outcome


# -- what a run sends -------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """One run's calls and everything needed to make them, JSON-able (`as_json`).

    `through` is how calls meet ratekit: ``"limiter"`` (``Limiter(Limits(**limits))``
    acquired, the permit held `call_s`), ``"submit"`` (``Scheduler.submit`` of a chat
    call to the provider, or of a `call_s` sleep without one) or ``"wrap"`` (a
    ``ratekit.wrap``ped SDK client, as a user has it). `calls` in all from `tasks`
    tasks (in all: a `Fleet` splits both, and `connections`, among its members);
    `calls` None runs until `run_s` after the start. `timeout_s` bounds the run.

    The account is ``Account(provider, tier=tier, period_scale=1 / speed,
    **account)``; a limiter workload uses ``Limits(**limits).compressed(speed)``.
    The provider is at `base_url` (Chat Completions for `api` ``"openai"``, the
    Messages API for ``"anthropic"``), the SDK client retrying `sdk_retries` times,
    sending `model`. Each request's user message is `prompt`, or with
    `prompt_words` ``"word "`` times a random count in that range; its ``max_tokens``
    a random count in `max_tokens` (seeded by `seed` and the `member`'s index).
    `connections` > 0 warms up first: one chat call to a throwaway mock provider (a
    cold client's first call is tens of ms slower), then that many keep-alive
    connections to `base_url`.

    The backend is the process's memory without `redis_url`, else a `RedisBackend`
    on `namespace` (`lease_ttl_s`, `cluster` passed on when set).

    `pool` runs a wrap workload through a `Pool` of accounts instead (its `client()`),
    ordered by `prefer`: one mapping per account, with its ``name`` and ``base_url``
    and optionally its ``provider``, ``tier``, ``account`` overrides, ``models`` and
    ``discount`` (the workload's own by default); each account's backend is the
    workload's, on ``<namespace>:<name>`` on Redis.
    """

    through: Through
    calls: int | None
    tasks: int
    run_s: float | None = None
    timeout_s: float = 60.0
    # the account
    provider: str = "moonshot"
    tier: str = "tier1"
    speed: float = 1.0
    account: Mapping[str, Any] = field(default_factory=dict)
    limits: Mapping[str, Any] | None = None
    # the provider and the requests
    base_url: str | None = None
    api: Api = "openai"
    sdk_retries: int = 0
    model: str = "kimi-k2"
    stream: bool = False
    prompt: str = "Say hello."
    prompt_words: tuple[int, int] | None = None
    max_tokens: tuple[int, int] = (50, 50)
    seed: int = 0
    call_s: float = 0.0
    connections: int = 0
    # the backend
    redis_url: str | None = None
    namespace: str = "workload"
    lease_ttl_s: float | None = None
    cluster: bool = False
    # a pool of accounts instead of one (see the docstring)
    pool: Sequence[Mapping[str, Any]] | None = None
    prefer: str = "order"
    # which member of a fleet runs this share (0 in one process)
    member: int = 0

    def __post_init__(self) -> None:
        if self.through not in ("limiter", "submit", "wrap"):
            raise ValueError(f"Workload.through: limiter, submit or wrap, not {self.through!r}")
        if self.pool is not None:
            if self.through != "wrap" or self.base_url is not None:
                raise ValueError(
                    "Workload: a pool runs a wrap workload, with each account's base_url"
                )
            for spec in self.pool:
                if not isinstance(spec.get("name"), str) or not isinstance(
                    spec.get("base_url"), str
                ):
                    raise ValueError(
                        f"Workload.pool: each account needs a name and a base_url, got {spec!r}"
                    )
        if self.calls is None and self.run_s is None:
            raise ValueError("Workload: give calls, run_s, or both")
        if (self.limits is not None) != (self.through == "limiter"):
            raise ValueError("Workload: limits are a limiter workload's, and it needs them")
        if self.through == "limiter" and self.base_url is not None:
            raise ValueError("Workload: a limiter workload sends to no provider")

    def provider_limits(self) -> Limits:
        """What the provider enforces, uncompressed (`MockProvider` compresses by its own
        speed): the tier's limits, or a limiter workload's `limits`."""
        if self.limits is not None:
            return Limits(**self.limits)
        from .._profiles import load_profile

        return load_profile(self.provider).tier(self.tier).limits()

    def share(self, member: int, members: int) -> Workload:
        """Member `member`'s part of a fleet of `members`: calls, tasks and connections
        split as evenly as they go (at least one task each)."""

        def part(total: int) -> int:
            return total // members + (1 if member < total % members else 0)

        return dataclasses.replace(
            self,
            calls=None if self.calls is None else part(self.calls),
            tasks=max(part(self.tasks), 1),
            connections=part(self.connections),
            member=member,
        )

    def requests(self) -> Iterator[dict[str, Any]]:
        """The Chat Completions bodies (without the model) of this member's calls, in
        order; `messages_request` maps one to the Messages API."""
        rng = random.Random(self.seed * 1000 + self.member)
        while True:
            words = None if self.prompt_words is None else rng.randint(*self.prompt_words)
            yield {
                "messages": [
                    {"role": "user", "content": self.prompt if words is None else "word " * words}
                ],
                "max_tokens": rng.randint(*self.max_tokens),
            }

    def as_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["account"] = dict(self.account)
        data["limits"] = None if self.limits is None else dict(self.limits)
        data["pool"] = None if self.pool is None else [dict(spec) for spec in self.pool]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Workload:
        pairs = {
            name: None if data.get(name) is None else (data[name][0], data[name][1])
            for name in ("prompt_words", "max_tokens")
            if name in data
        }
        return cls(**{**data, **pairs})


def messages_request(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Chat Completions body as a Messages API one: its system messages become
    ``system``, the others stay in order, and ``max_tokens`` (required) is kept."""
    messages = body["messages"]
    request: dict[str, Any] = {
        "messages": [message for message in messages if message["role"] != "system"],
        "max_tokens": body["max_tokens"],
    }
    system = [message["content"] for message in messages if message["role"] == "system"]
    if system:
        request["system"] = "\n\n".join(system)
    return request


def _usage_tokens(response: Any) -> float:
    """What a response says it used: Chat Completions' total, or Messages' input + output."""
    usage = response.usage
    total = getattr(usage, "total_tokens", None)
    return float(total if total is not None else usage.input_tokens + usage.output_tokens)


def _sdk_client(api: Api, base_url: str, retries: int) -> Any:
    sdk = importlib.import_module(api)
    if api == "anthropic":
        return sdk.AsyncAnthropic(base_url=base_url, api_key="workload", max_retries=retries)
    return sdk.AsyncOpenAI(base_url=base_url, api_key="workload", max_retries=retries)


def _sender(
    api: Api, client: Any, model: str, stream: bool
) -> Callable[[Mapping[str, Any]], Awaitable[object]]:
    """Sends one `Workload.requests` body with `client` (an SDK client, wrapped or not)
    and awaits the whole answer (a stream read to its end)."""
    create = client.messages.create if api == "anthropic" else client.chat.completions.create
    options: dict[str, Any] = {"stream": True} if stream else {}

    async def send(body: Mapping[str, Any]) -> object:
        request = messages_request(body) if api == "anthropic" else dict(body)
        answer = await create(model=model, **request, **options)
        if stream:
            async for _ in answer:
                pass
        return answer

    return send


class _LoopLag:
    """How late the event loop ran at worst: a task sleeps `_TICK_S` over and over and
    notes how much longer each sleep took."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._since = time.monotonic()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._since = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        while True:
            self._since = time.monotonic()
            await asyncio.sleep(_TICK_S)
            self.worst = max(self.worst, time.monotonic() - self._since - _TICK_S)

    async def stop(self) -> float:
        """Stops the probe (once; later calls change nothing); returns the worst lag."""
        task, self._task = self._task, None
        if task is not None:
            # The sleep under way counts too: a stall just before the stop.
            self.worst = max(self.worst, time.monotonic() - self._since - _TICK_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        return self.worst


# -- one process ------------------------------------------------------------------------


class Driver:
    """A `Workload` in this process, ready to run.

    ``async with Driver(workload) as driver`` builds the backend, the limiter or the
    scheduler (``driver.limiter``, ``driver.scheduler``) and the SDK client, warms
    up, and connects; ``await driver.run()`` then makes the calls (once). Closed
    on exit. The event loop's lag is measured from entry to the run's end.
    """

    def __init__(self, workload: Workload) -> None:
        self.workload = workload
        self.outcome = Outcome()
        self.scheduler: Scheduler | None = None
        self.pool: Pool | None = None
        self._limiter: Limiter | None = None
        self._backends: list[Backend] = []
        self._clients: list[Any] = []
        self._send: Callable[[Mapping[str, Any]], Awaitable[object]] | None = None
        # Tokens in a text as the mock provider counts them (with a provider).
        self._count: Callable[[str], int] | None = None
        self._bodies: list[dict[str, Any]] = []
        self._more_bodies = workload.requests()
        self._deadline: float | None = None
        self._lag = _LoopLag()

    @property
    def limiter(self) -> Limiter:
        """The limiter every call is admitted by (the scheduler's, if there is one)."""
        if self._limiter is None:
            raise RuntimeError("Driver: enter it first (async with Driver(workload))")
        return self._limiter

    async def __aenter__(self) -> Driver:
        w = self.workload
        if w.through == "wrap" and w.base_url is None and w.pool is None:
            raise ValueError("Driver: a wrap workload sends to a provider: give its base_url")
        # Imported before the lag is measured.
        if w.base_url is not None or w.pool is not None:
            importlib.import_module(w.api)
            from .mock_provider import estimate_tokens

            self._count = estimate_tokens
        from ..integrations._wrap import wrap

        self._lag.start()
        try:
            if w.pool is not None:
                self._make_pool()
            elif w.limits is not None:
                limits = Limits(**w.limits).compressed(w.speed)
                self._limiter = Limiter(limits, backend=self._make_backend(w.namespace))
            else:
                account = Account(w.provider, tier=w.tier, period_scale=1 / w.speed, **w.account)
                self.scheduler = Scheduler(
                    account, backend=self._make_backend(w.namespace), hooks=[self.outcome.record]
                )
                self._limiter = self.scheduler.limiter()
            if w.base_url is not None:
                client = _sdk_client(w.api, w.base_url, w.sdk_retries)
                self._clients.append(client)
                sent = client
                if w.through == "wrap":
                    assert self.scheduler is not None
                    sent = wrap(client, self.scheduler)
                self._send = _sender(w.api, sent, w.model, w.stream)
            if w.connections > 0 and self._clients:
                await self._warm_up()
            for limiter in self._limiters():
                await limiter.statistics()  # connected, scripts loaded
        except BaseException:
            await self._close()
            raise
        return self

    def _make_pool(self) -> None:
        """The accounts of `Workload.pool`, each with its scheduler, backend and client,
        behind one `Pool` whose client sends every call."""
        w = self.workload
        assert w.pool is not None
        members = {}
        for spec in w.pool:
            name = spec["name"]
            account = Account(
                spec.get("provider", w.provider),
                tier=spec.get("tier", w.tier),
                period_scale=1 / w.speed,
                **{**w.account, **spec.get("account", {})},
            )
            backend = self._make_backend(f"{w.namespace}:{name}")
            scheduler = Scheduler(account, backend=backend, hooks=[self.outcome.record])
            client = _sdk_client(w.api, spec["base_url"], w.sdk_retries)
            self._clients.append(client)
            members[name] = Member(
                scheduler, client, models=spec.get("models"), discount=spec.get("discount", 1.0)
            )
        self.pool = Pool(members, prefer=w.prefer)
        self._limiter = next(iter(members.values())).scheduler.limiter()
        self._send = _sender(w.api, self.pool.client(), w.model, w.stream)

    def _limiters(self) -> list[Limiter]:
        """The limiter of each account the calls go through."""
        if self.pool is not None:
            return [member.scheduler.limiter() for member in self.pool.members.values()]
        return [self.limiter]

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self._close()

    async def run(self, start_at: float | None = None) -> Outcome:
        """Make the calls and return their `Outcome`. With `start_at` (a ``time.time()``
        instant) the account is paused until then, every task queued behind the pause."""
        w, outcome = self.workload, self.outcome
        call = {"limiter": self._acquire, "submit": self._submit, "wrap": self._wrapped}
        now = time.time()
        if start_at is not None and start_at > now:
            for limiter in self._limiters():
                await limiter.pause(start_at - now)
        outcome.started_at = now if start_at is None else max(start_at, now)
        if w.run_s is not None:
            self._deadline = outcome.started_at + w.run_s
        with anyio.fail_after(w.timeout_s):
            await drive(
                call[w.through], calls=w.calls, tasks=w.tasks, outcome=outcome, until=self._deadline
            )
        outcome.elapsed_s = time.time() - outcome.started_at
        # Read while the backends are open: a closed RedisBackend answers nothing.
        if self.scheduler is not None:
            outcome.factors = dict((await self.scheduler.statistics()).factors)
        if self.pool is not None:
            for name, member in self.pool.members.items():
                factors = (await member.scheduler.statistics()).factors
                outcome.factors.update({f"{name}:{group}": f for group, f in factors.items()})
        outcome.max_lag_s = await self._lag.stop()
        return outcome

    # -- the calls, by `Workload.through`

    async def _acquire(self, index: int) -> object:
        timeout = None if self._deadline is None else self._deadline - time.time()
        if timeout is not None and timeout <= 0:
            raise StopTask
        try:
            async with self.limiter.acquire(timeout=timeout) as permit:
                granted = time.time()
                where = _slice_index(permit)
                await anyio.sleep(self.workload.call_s)
                self.outcome.admissions.append((granted, time.time(), where))
        except AcquireTimeout:
            if self._deadline is None:
                raise
            raise StopTask from None  # no admission before the deadline
        return True

    async def _submit(self, index: int) -> object:
        assert self.scheduler is not None
        if self._send is None:
            call_s = self.workload.call_s

            async def work() -> bool:
                await anyio.sleep(call_s)
                return True

            return await self.scheduler.submit(work)
        send, count, body = self._send, self._count, self._body(index)
        assert count is not None

        async def chat() -> object:
            return await send(body)

        # The prompt as the mock provider counts it, and the most the answer may take.
        prompt = sum(count(message["content"]) for message in body["messages"])
        tokens = prompt + body["max_tokens"]
        return await self.scheduler.submit(chat, tokens=tokens, usage=_usage_tokens)

    async def _wrapped(self, index: int) -> object:
        assert self._send is not None
        return await self._send(self._body(index))

    def _body(self, index: int) -> dict[str, Any]:
        """Call `index`'s request: the same whichever task makes it."""
        while len(self._bodies) <= index:
            self._bodies.append(next(self._more_bodies))
        return self._bodies[index]

    # -- building and closing

    def _make_backend(self, namespace: str) -> Backend:
        w = self.workload
        backend: Backend
        if w.redis_url is None:
            backend = MemoryBackend()
        else:
            from ..backends.redis import RedisBackend

            options: dict[str, Any] = {"cluster": w.cluster}
            if w.lease_ttl_s is not None:
                options["lease_ttl_s"] = w.lease_ttl_s
            backend = RedisBackend(w.redis_url, namespace=namespace, **options)
        self._backends.append(backend)
        return backend

    async def _warm_up(self) -> None:
        """A first chat call to a throwaway provider, then `connections` keep-alive
        connections to the real one (``GET /v1/models`` counts in no window)."""
        from .mock_provider import MockProvider

        w = self.workload
        async with MockProvider(Limits(), speed=w.speed) as throwaway:
            url = throwaway.anthropic_base_url if w.api == "anthropic" else throwaway.base_url
            cold = _sdk_client(w.api, url, 0)
            try:
                await _sender(w.api, cold, w.model, False)(next(w.requests()))
            finally:
                await cold.close()

        async def connect(client: Any) -> None:
            await client.models.list()

        async with anyio.create_task_group() as group:
            for index in range(w.connections):
                group.start_soon(connect, self._clients[index % len(self._clients)])

    async def _close(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            for client in self._clients:
                await client.close()
            for backend in self._backends:
                await backend.aclose()
        await self._lag.stop()


def _slice_index(permit: Admission) -> float:
    """The first rate's slice index of a Redis admission, as the server's script wrote it
    (NaN on other backends)."""
    indexes = getattr(permit._grant, "indexes", None)
    return float(indexes[0]) if indexes else math.nan


# -- a fleet of processes -----------------------------------------------------------------


class Fleet:
    """`members` processes, each a `Driver` on its `Workload.share`, released together.

    They share one account through Redis (`Workload.redis_url`), or each keeps its own.
    ``async with Fleet(workload, 4) as fleet`` starts them and returns once each has
    built its client and connected; ``await fleet.start()`` releases them (every
    account paused until `START_PAUSE_S` later); ``await fleet.outcomes()`` waits for
    each member's `Outcome`. ``await Fleet(workload, 4).run()`` does all three. Any member
    still running on exit is killed. `env` is the members' environment (None: this
    process's).
    """

    def __init__(
        self,
        workload: Workload,
        members: int,
        *,
        env: Mapping[str, str] | None = None,
        ready_timeout_s: float = 30.0,
    ) -> None:
        self.workload = workload
        self.members = members
        self.env = None if env is None else dict(env)
        self.ready_timeout_s = ready_timeout_s
        self.processes: list[anyio.abc.Process] = []
        self._stdout: list[BufferedByteReceiveStream] = []
        self._stderr: list[IO[bytes]] = []
        self._files = contextlib.ExitStack()

    async def run(self, pause_s: float = START_PAUSE_S) -> list[Outcome]:
        async with self:
            await self.start(pause_s)
            return await self.outcomes()

    async def __aenter__(self) -> Fleet:
        try:
            for member in range(self.members):
                share = self.workload.share(member, self.members)
                command = [sys.executable, "-m", _MEMBER, json.dumps(share.as_json())]
                # Lives as long as the fleet: closed with `_files` when it is left.
                stderr = self._files.enter_context(tempfile.TemporaryFile())  # noqa: SIM115
                self._stderr.append(stderr)
                process = await anyio.open_process(command, stderr=stderr, env=self.env)
                self.processes.append(process)
                assert process.stdout is not None
                self._stdout.append(BufferedByteReceiveStream(process.stdout))
            for member in range(self.members):
                line = b""
                with anyio.move_on_after(self.ready_timeout_s):
                    line = await self._stdout[member].receive_until(b"\n", 1 << 16)
                if line.strip() != b"ready":
                    raise WorkloadError(
                        f"fleet member {member} did not start (it said {line!r}): "
                        f"{self._errors(member)}"
                    )
        except BaseException:
            await self._kill()
            raise
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self._kill()

    async def start(self, pause_s: float = START_PAUSE_S) -> float:
        """Release every member; returns the wall-clock instant their account opens."""
        start_at = time.time() + pause_s
        for process in self.processes:
            assert process.stdin is not None
            await process.stdin.send(f"{start_at!r}\n".encode())
        return start_at

    async def outcomes(self) -> list[Outcome]:
        """Each member's `Outcome`, in order, once all have finished; `WorkloadError` if
        one failed or is still running `Workload.timeout_s` + 30 s on."""
        results = []
        with anyio.fail_after(self.workload.timeout_s + 30):
            for member, process in enumerate(self.processes):
                chunks = []
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        chunks.append(await self._stdout[member].receive())
                if await process.wait() != 0:
                    raise WorkloadError(
                        f"fleet member {member} failed (exit {process.returncode}): "
                        f"{self._errors(member)}"
                    )
                last = b"".join(chunks).decode().strip().splitlines()[-1]
                results.append(Outcome.from_json(json.loads(last)))
        return results

    def _errors(self, member: int) -> str:
        stderr = self._stderr[member]
        stderr.seek(0)
        return stderr.read().decode(errors="replace")[-3000:] or "(no stderr)"

    async def _kill(self) -> None:
        with anyio.CancelScope(shield=True):
            for process in self.processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.aclose()
        self._files.close()


async def _member(workload: Workload) -> Outcome:
    async with Driver(workload) as driver:
        print("ready", flush=True)
        start_at = float(await anyio.to_thread.run_sync(sys.stdin.readline))
        return await driver.run(start_at)


def main() -> None:
    """A fleet member: ``python -m ratekit.testing.workload '<Workload as JSON>'`` builds
    its `Driver`, prints ``ready``, reads the wall-clock start instant from a line of
    stdin, runs, and prints its `Outcome` as one JSON line."""
    workload = Workload.from_json(json.loads(sys.argv[1]))
    outcome = asyncio.run(_member(workload))
    print(json.dumps(outcome.as_json()), flush=True)


# -- how much of a limit a run used ------------------------------------------------------


def steady_utilisation(
    stamps: Sequence[float], amounts: Sequence[float], limit: float, period_s: float
) -> float:
    """How much of a rate a run used in its steady state, as the provider saw it.

    `stamps` are the provider's arrival instants (any order) and `amounts` what
    each counted. The mean amount in a window of `period_s`, over the windows that
    start after the first half period of the run and end before its last arrival
    (sampled at 200 starts), divided by `limit`. NaN for a run shorter than 1.5
    periods, which has no steady state.
    """
    if len(stamps) != len(amounts):
        raise ValueError("steady_utilisation: one amount per stamp")
    if not stamps:
        return math.nan
    order = sorted(range(len(stamps)), key=stamps.__getitem__)
    times = [stamps[i] for i in order]
    prefix = [0.0]
    for i in order:
        prefix.append(prefix[-1] + amounts[i])
    first = times[0] + period_s / 2
    last = times[-1] - period_s  # the last window ends at the last arrival
    if last < first:
        return math.nan
    samples = 200
    total = 0.0
    for k in range(samples):
        start = first + (last - first) * k / (samples - 1)
        low = bisect.bisect_left(times, start)
        high = bisect.bisect_left(times, start + period_s)
        total += prefix[high] - prefix[low]
    return total / samples / limit


def binding_utilisation(
    limits: Limits, requests: Sequence[float], tokens: Sequence[tuple[float, float]]
) -> tuple[str, float]:
    """The rate of `limits` a run used most of in its steady state, and that share.

    `requests` are the instants the provider counted each request at; `tokens` the
    (instant, amount) of each count of tokens (prompt + max output at arrival, or
    what was used at completion, as the provider counts). ``("none", nan)`` for a
    run too short to have a steady state.
    """
    best_name, best = "none", math.nan
    for rate in limits.all_rates:
        if rate.unit == "requests":
            share = steady_utilisation(requests, [1.0] * len(requests), rate.limit, rate.period_s)
        elif rate.unit == "tokens":
            stamps, amounts = [t for t, _ in tokens], [a for _, a in tokens]
            share = steady_utilisation(stamps, amounts, rate.limit, rate.period_s)
        else:
            continue
        if not math.isnan(share) and (math.isnan(best) or share > best):
            best_name, best = rate.name, share
    return best_name, best


if __name__ == "__main__":
    main()
