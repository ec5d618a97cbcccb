"""429s and steady-state utilisation against the strict mock provider: ratekit beside peers.

Run from the repository root::

    python -m bench.provider [--quick] [--rows 1,4] [--json]

Every run starts a fresh `ratekit.testing.mock_provider.ProviderProcess` (a child process
that counts exact rolling windows and answers 429 on any excess) and sends it one
workload of chat completions through the real `openai` client from 80 tasks (4
processes of 20 in row 3), limited by one contender:

- ratekit, library defaults but for the time compression:
  ``ratekit.wrap(openai.AsyncOpenAI(...), Scheduler(Account("moonshot", tier="tier1",
  period_scale=1 / speed)))`` and no per-call options (a 50 ms margin, "safe" token
  counting, its own token estimates; `wrap` retries 429s itself);
- aiolimiter: ``AsyncLimiter(limit, period)``, ``await acquire(amount)`` per call;
- limits: ``MovingWindowRateLimiter`` over ``MemoryStorage`` (``RedisStorage`` in
  row 3), ``RateLimitItemPerSecond(limit, period)``, ``hit(item, key, cost=amount)``
  polled every 10 ms until it succeeds.

The peers are set at exactly the tier's numbers. Neither caps concurrency, so their
calls also hold an ``asyncio.Semaphore`` of the tier's 50 (12 in each of 4
processes); their client has ``max_retries=0`` and a 429 is a failed call.

Workloads. RPM rows: Moonshot Tier1 (200 RPM, 50 in flight, 2,000,000 TPM),
prompts of 90-110 characters, ``max_tokens=50``; peers acquire 1 a call; a minute
lasts 5 s (x12), 6 s when streamed (x10: the SDK's stream parsing is CPU-heavy);
one openai SDK process sends ~130 calls/s at most on 2 cores, so at stronger
compression every contender measures the SDK's CPU, not its limiter.
TPM rows: the same tier with ``tpm=20_000`` and no RPM on both sides, prompts of
800-1,200 characters, ``max_tokens`` 100-200, 50 tokens of output, a minute in
3 s (x20). The peers reserve the prompt's tokens as the
mock counts them at factor 1.0 (`ratekit.testing.mock_provider.estimate_tokens`) plus
``max_tokens``: an exact tokenizer, the best a fixed estimate can do. ratekit
estimates as it does by default (`wrap`'s estimator: tiktoken if installed, else
its heuristic, scaled by what the provider reports it counted). The provider's
``tokenizer_factor`` makes its count of a prompt 30 % above or below the mock's.

A call takes 1.5 provider seconds. A workload is as many calls as the binding
limit holds, as the provider counts them, for ``periods + 1`` periods (3, or 2
with ``--quick``): a client at 100 % of the limit sends a period's worth at once
and ends ``periods`` periods later.

Columns: calls sent; calls that failed (a 429 not retried, or retried until ratekit
gave up); 429s the provider sent (`statistics().rejected`, every dimension); the
steady-state utilisation of the binding limit, from the provider's own records
(`ratekit.testing.simulation.steady_utilisation`: arrivals and 1 a call for RPM, arrivals
and the provider's reservation for reserve-counted TPM, completions and prompt +
completion for usage-counted TPM; the mean of one-period windows, leaving out the
first half period and the last period, over the limit); wall seconds from the first
call to the last answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import openai

import ratekit
from ratekit.testing.mock_provider import MockProvider, ProviderProcess, estimate_tokens
from ratekit.testing.workload import steady_utilisation

ROOT = Path(__file__).resolve().parent.parent
PROVIDER = "moonshot"
TIER = "tier1"
MODEL = "kimi-k2"
TIER_LIMITS = ratekit.load_profile(PROVIDER).tier(TIER).limits()
RPM = int(TIER_LIMITS.rpm or 0)
CONCURRENCY = TIER_LIMITS.concurrency or 0  # on the provider and the peers' semaphore
TASKS = 80
MEMBERS = 4  # processes of the shared rows
TPM = 20_000  # the TPM rows' own limit, on both sides
LATENCY_S = 1.5  # provider seconds a call takes (divided by the speed)
TPM_COMPLETION_TOKENS = 50  # output tokens of a TPM row's call (RPM rows: the mock's 16)
POLL_S = 0.01  # how often a limits caller asks again
WORDS = ("rate", "limit", "token", "window", "budget", "queue", "provider", "minute")

Binding = Literal["rpm", "tpm"]
Counting = Literal["reserve", "usage"]


# -- workloads ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One chat completion: its prompt, its output cap, and `estimate`, the tokens a peer
    reserves for it: the prompt's tokens as the mock counts them at factor 1.0
    (`estimate_tokens`) plus the output cap (computed once, outside the timed loop)."""

    prompt: str
    max_tokens: int
    estimate: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "estimate", estimate_tokens(self.prompt) + self.max_tokens)


def _text(rng: random.Random, characters: int) -> str:
    """Filler words, `characters` long."""
    words = rng.choices(WORDS, k=characters // 4 + 1)  # every word is 4 characters or more
    return " ".join(words)[:characters]


@dataclass(frozen=True)
class Scenario:
    """One row's setup: what binds, how fast time runs, how the provider counts."""

    number: int
    title: str
    binding: Binding
    speed: float
    periods: int  # a run at 100 % of the binding limit lasts this many periods
    stream: bool = False
    members: int = 1
    counting: Counting = "reserve"
    factor: float = 1.0

    @property
    def period_s(self) -> float:
        return 60 / self.speed

    @property
    def limit(self) -> int:
        """The binding limit per period, in provider numbers."""
        return RPM if self.binding == "rpm" else TPM

    def provider_limits(self) -> ratekit.Limits:
        if self.binding == "rpm":
            return TIER_LIMITS
        return ratekit.Limits(concurrency=CONCURRENCY, tpm=TPM)

    def provider_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {
            "speed": self.speed,
            "token_counting": self.counting,
            "tokenizer_factor": self.factor,
            "latency_s": LATENCY_S,
        }
        if self.binding == "tpm":
            options["completion_tokens"] = TPM_COMPLETION_TOKENS
        return options

    def account(self, **overrides: Any) -> ratekit.Account:
        """ratekit's account: the tier's defaults, compressed (and the TPM rows' numbers)."""
        if self.binding == "tpm":
            overrides = {"tpm": TPM, "rpm": None, **overrides}
        return ratekit.Account(PROVIDER, tier=TIER, period_scale=1 / self.speed, **overrides)

    def amount(self, call: Call) -> int:
        """What a peer acquires for `call`: a request, or its estimated tokens."""
        return 1 if self.binding == "rpm" else call.estimate

    def counted(self, call: Call) -> int:
        """What the provider counts for `call` against the binding limit."""
        if self.binding == "rpm":
            return 1
        prompt = math.ceil(estimate_tokens(call.prompt) * self.factor)
        if self.counting == "reserve":
            return prompt + call.max_tokens
        return prompt + min(call.max_tokens, TPM_COMPLETION_TOKENS)

    def workload(self, seed: int, share: int = 1) -> tuple[Call, ...]:
        """Calls (one process's `share` of them) that fill the binding limit, as the
        provider counts them, for ``periods + 1`` periods: a client at 100 % of the limit
        sends the first period's at once and ends `periods` periods later."""
        return _workload(self, seed, share)

    def utilisation(self, records: list[Any]) -> float:
        """The binding limit's steady-state share, from the provider's call records."""
        if self.binding == "rpm":
            stamps = [r.arrived_s for r in records]
            amounts = [1.0] * len(records)
        elif self.counting == "reserve":
            stamps = [r.arrived_s for r in records]
            amounts = [float(r.reserved_tokens) for r in records]
        else:
            stamps = [r.finished_s for r in records]
            amounts = [float(r.prompt_tokens + r.completion_tokens) for r in records]
        return steady_utilisation(stamps, amounts, self.limit, self.period_s)


@functools.cache
def _workload(scenario: Scenario, seed: int, share: int) -> tuple[Call, ...]:
    rng = random.Random(seed)
    budget = scenario.limit * (scenario.periods + 1) / share
    calls: list[Call] = []
    counted = 0
    while counted < budget:
        if scenario.binding == "rpm":
            call = Call(_text(rng, rng.randint(90, 110)), 50)
        else:
            call = Call(_text(rng, rng.randint(800, 1200)), rng.randint(100, 200))
        calls.append(call)
        counted += scenario.counted(call)
    return tuple(calls)


def scenarios(quick: bool) -> list[Scenario]:
    periods = 2 if quick else 3
    return [
        Scenario(1, "RPM, 1 process, x12", "rpm", 12, periods),
        Scenario(2, "RPM, 1 process, streamed, x10", "rpm", 10, periods, stream=True),
        Scenario(3, f"RPM, {MEMBERS} processes, Redis, x12", "rpm", 12, periods, members=MEMBERS),
        Scenario(4, "TPM, reserve, tokenizer 1.0, x20", "tpm", 20, periods),
        Scenario(5, "TPM, reserve, tokenizer 1.3, x20", "tpm", 20, periods, factor=1.3),
        Scenario(6, "TPM, reserve, tokenizer 0.7, x20", "tpm", 20, periods, factor=0.7),
        Scenario(7, "TPM, usage at completion, x20", "tpm", 20, periods, counting="usage"),
    ]


# -- contenders ---------------------------------------------------------------------------

Caller = Callable[[Call], Awaitable[None]]


async def nothing() -> None:
    return None


@dataclass
class Session:
    """A contender ready to call: `call` makes one limited call, `client` is the openai
    client underneath (to open connections), `ready` connects whatever else it uses."""

    call: Caller
    client: openai.AsyncOpenAI
    ready: Callable[[], Awaitable[None]] = nothing


@dataclass(frozen=True)
class Shared:
    """Where the processes of a shared row meet."""

    redis_url: str
    namespace: str
    members: int


Contender = Callable[
    [Scenario, str, Shared | None], contextlib.AbstractAsyncContextManager[Session]
]


async def complete(client: Any, scenario: Scenario, call: Call, **extra: Any) -> None:
    """One chat completion; a streamed one is read to its end."""
    messages = [{"role": "user", "content": call.prompt}]
    if not scenario.stream:
        await client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=call.max_tokens, **extra
        )
        return
    stream = await client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=call.max_tokens, stream=True, **extra
    )
    async for _ in stream:
        pass


def _ratekit(**account_overrides: Any) -> Contender:
    @contextlib.asynccontextmanager
    async def session(
        scenario: Scenario, base_url: str, shared: Shared | None
    ) -> AsyncIterator[Session]:
        backend: ratekit.backends.Backend | None = None
        if shared is not None:
            from ratekit.backends.redis import RedisBackend

            backend = RedisBackend(shared.redis_url, namespace=shared.namespace)
        scheduler = ratekit.Scheduler(scenario.account(**account_overrides), backend=backend)
        client = openai.AsyncOpenAI(base_url=base_url, api_key="x")
        wrapped = ratekit.wrap(client, scheduler)

        async def call(call: Call) -> None:
            await complete(wrapped, scenario, call)  # ratekit estimates (and learns) itself

        async def ready() -> None:
            await scheduler.limiter().statistics()  # connected, scripts loaded

        try:
            yield Session(call, client, ready)
        finally:
            await client.close()
            if backend is not None:
                await backend.aclose()

    return session


def _gate(shared: Shared | None) -> asyncio.Semaphore:
    """The tier's concurrency for a peer that has no cap of its own (its share of it)."""
    return asyncio.Semaphore(CONCURRENCY // (shared.members if shared else 1))


@contextlib.asynccontextmanager
async def aiolimiter_session(
    scenario: Scenario, base_url: str, shared: Shared | None
) -> AsyncIterator[Session]:
    from aiolimiter import AsyncLimiter

    if shared is not None:
        raise ValueError("aiolimiter has no shared mode")
    limiter = AsyncLimiter(scenario.limit, scenario.period_s)
    gate = _gate(shared)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)

    async def call(call: Call) -> None:
        async with gate:
            await limiter.acquire(scenario.amount(call))
            await complete(client, scenario, call)

    try:
        yield Session(call, client)
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def limits_session(
    scenario: Scenario, base_url: str, shared: Shared | None
) -> AsyncIterator[Session]:
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import MemoryStorage, RedisStorage, Storage
    from limits.aio.strategies import MovingWindowRateLimiter

    if not float(scenario.period_s).is_integer():
        raise ValueError("limits' items last whole seconds")
    item = RateLimitItemPerSecond(scenario.limit, int(scenario.period_s))
    storage: Storage = MemoryStorage()
    key = "bench"
    if shared is not None:
        url = shared.redis_url.replace("redis://", "async+redis://", 1)
        storage = RedisStorage(url, implementation="redispy")
        key = shared.namespace
    strategy = MovingWindowRateLimiter(storage)
    gate = _gate(shared)
    client = openai.AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0)

    async def call(call: Call) -> None:
        async with gate:
            # limits has no waiting acquire: ask again until the window has room.
            while not await strategy.hit(item, key, cost=scenario.amount(call)):  # noqa: ASYNC110
                await asyncio.sleep(POLL_S)
            await complete(client, scenario, call)

    async def ready() -> None:
        await strategy.test(item, key)  # connected

    try:
        yield Session(call, client, ready)
    finally:
        await client.close()


CONTENDERS: dict[str, Contender] = {
    "ratekit": _ratekit(),
    "aiolimiter": aiolimiter_session,
    "limits": limits_session,
    # Not a default: the account told that the provider counts usage at completion.
    "ratekit, token_counting=usage": _ratekit(token_counting="usage"),
}
SHARED_CONTENDERS = ("ratekit", "limits")


# -- runs ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """What the callers saw: failures by kind, the first few errors."""

    failed_429: int = 0
    failed_other: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, other: Outcome) -> None:
        self.failed_429 += other.failed_429
        self.failed_other += other.failed_other
        self.errors += other.errors[: 5 - len(self.errors)]


async def drive(call: Caller, workload: Iterable[Call], tasks: int) -> Outcome:
    """Make every call of `workload` from `tasks` tasks; a failed call is counted, not raised."""
    outcome = Outcome()
    pending = iter(workload)

    async def worker() -> None:
        for item in pending:
            try:
                await call(item)
            except openai.RateLimitError:
                outcome.failed_429 += 1
            except Exception as error:  # every lost call is counted, the first few shown
                outcome.failed_other += 1
                if len(outcome.errors) < 5:
                    outcome.errors.append(repr(error))

    async with asyncio.TaskGroup() as group:
        for _ in range(tasks):
            group.create_task(worker())
    return outcome


async def warm_sdk() -> None:
    """One plain and one streamed call to a throwaway provider: the openai SDK's first call
    of each kind imports and builds what later ones reuse."""
    async with MockProvider(ratekit.Limits()) as throwaway:
        client = openai.AsyncOpenAI(base_url=throwaway.base_url, api_key="x", max_retries=0)
        try:
            for stream in (False, True):
                scenario = Scenario(0, "", "rpm", 1, 1, stream=stream)
                await complete(client, scenario, Call("hello", 5))
        finally:
            await client.close()


async def open_connections(client: openai.AsyncOpenAI, count: int) -> None:
    """`count` keep-alive connections (``GET /v1/models`` counts in no window)."""

    async def one() -> None:
        await client.models.list()

    async with asyncio.TaskGroup() as group:
        for _ in range(count):
            group.create_task(one())


@dataclass(frozen=True)
class Row:
    contender: str
    row: int
    scenario: str
    calls: int
    failed: int
    rejected_429: int
    utilisation: float
    wall_s: float
    errors: list[str]


async def run_local(scenario: Scenario, name: str) -> Row:
    """One contender in this process against a fresh provider."""
    workload = scenario.workload(seed=scenario.number)
    async with ProviderProcess(scenario.provider_limits(), **scenario.provider_options()) as server:
        async with CONTENDERS[name](scenario, server.base_url, None) as session:
            await open_connections(session.client, CONCURRENCY)
            await session.ready()
            started = time.perf_counter()
            outcome = await drive(session.call, workload, TASKS)
            wall_s = time.perf_counter() - started
        records = await server.calls()
        statistics = await server.statistics()
    return Row(
        name,
        scenario.number,
        scenario.title,
        len(workload),
        outcome.failed_429 + outcome.failed_other,
        sum(statistics.rejected.values()),
        scenario.utilisation(records),
        wall_s,
        outcome.errors,
    )


def _start_member(config: dict[str, Any]) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "bench.provider", "--member", json.dumps(config)]
    return subprocess.Popen(
        command, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


async def run_shared(scenario: Scenario, name: str, redis_url: str) -> Row:
    """`scenario.members` processes of one contender sharing the account through Redis."""
    async with ProviderProcess(scenario.provider_limits(), **scenario.provider_options()) as server:
        base = {
            "contender": name,
            "scenario": asdict(scenario),
            "base_url": server.base_url,
            "redis_url": redis_url,
            "namespace": f"bench-provider-{uuid.uuid4().hex[:12]}",
        }
        processes = [_start_member({**base, "index": index}) for index in range(scenario.members)]
        outcome = Outcome()
        calls = 0
        try:
            for process in processes:
                assert process.stdout is not None
                line = await asyncio.to_thread(process.stdout.readline)
                if line.strip() != "ready":
                    raise SystemExit(f"bench.provider: a member said {line!r}")
            start_at = time.time() + 0.2
            for process in processes:
                assert process.stdin is not None
                process.stdin.write(f"{start_at!r}\n")
                process.stdin.flush()
            ended_at = start_at
            for process in processes:
                stdout, _ = await asyncio.to_thread(process.communicate)
                report = json.loads(stdout.splitlines()[-1])
                outcome.add(Outcome(report["failed_429"], report["failed_other"], report["errors"]))
                ended_at = max(ended_at, report["ended_at"])
                calls += report["calls"]
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        records = await server.calls()
        statistics = await server.statistics()
    return Row(
        f"{name} (Redis)",
        scenario.number,
        scenario.title,
        calls,
        outcome.failed_429 + outcome.failed_other,
        sum(statistics.rejected.values()),
        scenario.utilisation(records),
        ended_at - start_at,
        outcome.errors,
    )


async def member(config: dict[str, Any]) -> dict[str, Any]:
    """One process of a shared row: prints ``ready``, reads the wall-clock start instant
    from stdin, makes its calls; returns its outcome."""
    scenario = Scenario(**config["scenario"])
    shared = Shared(config["redis_url"], config["namespace"], scenario.members)
    workload = scenario.workload(scenario.number * 100 + config["index"], scenario.members)
    await warm_sdk()
    async with CONTENDERS[config["contender"]](scenario, config["base_url"], shared) as session:
        await open_connections(session.client, CONCURRENCY // scenario.members)
        await session.ready()
        print("ready", flush=True)
        start_at = float(await asyncio.to_thread(sys.stdin.readline))
        await asyncio.sleep(max(start_at - time.time(), 0.0))
        outcome = await drive(session.call, workload, TASKS // scenario.members)
        ended_at = time.time()
    return {**asdict(outcome), "calls": len(workload), "ended_at": ended_at}


async def run_all(numbers: set[int], quick: bool) -> list[Row]:
    await warm_sdk()
    rows: list[Row] = []
    binary = shutil.which("redis-server")
    for scenario in scenarios(quick):
        if scenario.number not in numbers:
            continue
        if scenario.members > 1:
            if binary is None:
                print("bench.provider: no redis-server on PATH; row 3 skipped", file=sys.stderr)
                continue
            from ratekit.testing import RedisServer

            with RedisServer(binary) as redis:
                for name in SHARED_CONTENDERS:
                    rows.append(await run_shared(scenario, name, redis.url))
                    _progress(rows[-1])
            continue
        names = ["ratekit", "aiolimiter", "limits"]
        if scenario.counting == "usage":
            names.append("ratekit, token_counting=usage")
        for name in names:
            rows.append(await run_local(scenario, name))
            _progress(rows[-1])
    return rows


# -- output -------------------------------------------------------------------------------


def _progress(row: Row) -> None:
    print(
        f"  row {row.row} {row.contender}: {row.rejected_429} 429s, "
        f"{_percent(row.utilisation)}, {row.wall_s:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1%}"


def revision() -> str:
    """The repository's commit, and whether ratekit/ has changes not committed."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--", "ratekit"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    if not commit:
        return "unknown"
    return f"{commit}, with uncommitted changes in ratekit/" if changed else commit


def print_table(rows: list[Row], load: tuple[float, float, float], quick: bool, at: str) -> None:
    print(
        f"429s and steady-state utilisation against the strict mock provider "
        f"({'quick' if quick else 'full'} run; ratekit at {at}; {os.cpu_count()} CPUs, "
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})\n"
    )
    header = ["#", "scenario", "contender", "calls", "failed", "429s", "utilisation", "wall"]
    lines = [
        [
            str(row.row),
            row.scenario,
            row.contender,
            f"{row.calls:,}",
            f"{row.failed:,}",
            f"{row.rejected_429:,}",
            _percent(row.utilisation),
            f"{row.wall_s:.1f} s",
        ]
        for row in rows
    ]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    left = {1, 2}

    def render(cells: list[str]) -> str:
        padded = [
            cell.ljust(width) if i in left else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    print(render(header))
    print(
        "|"
        + "|".join("-" * (w + 1) + (":" if i not in left else "-") for i, w in enumerate(widths))
        + "|"
    )
    for cells in lines:
        print(render(cells))
    errors = [(row, error) for row in rows for error in row.errors]
    if errors:
        print("\nErrors other than 429 (first few per row):")
        for row, error in errors:
            print(f"- row {row.row}, {row.contender}: {error}")


def _json_row(row: Row) -> dict[str, Any]:
    fields = asdict(row)
    if math.isnan(row.utilisation):
        fields["utilisation"] = None  # no steady state: strict JSON has no NaN
    return fields


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.provider",
        description=(__doc__ or "").split("\n\n")[0],
    )
    parser.add_argument("--quick", action="store_true", help="2 periods a run instead of 3")
    parser.add_argument("--rows", default="1,2,3,4,5,6,7", help="rows to run (1-7)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--member", help=argparse.SUPPRESS)  # a process of a shared row
    args = parser.parse_args(argv)
    if args.member is not None:
        report = asyncio.run(member(json.loads(args.member)))
        print(json.dumps(report), flush=True)
        return
    load = os.getloadavg()
    at = revision()
    print(f"bench.provider: load average {load[0]:.2f} at start", file=sys.stderr)
    try:
        numbers = {int(part) for part in args.rows.split(",") if part}
    except ValueError:
        parser.error(f"--rows: row numbers, comma-separated, got {args.rows!r}")
    if not numbers or not numbers <= {1, 2, 3, 4, 5, 6, 7}:
        parser.error(f"--rows: numbers from 1 to 7, got {args.rows!r}")
    rows = asyncio.run(run_all(numbers, args.quick))
    if args.json:
        report = {
            "cpus": os.cpu_count(),
            "load_average": load,
            "quick": args.quick,
            "revision": at,
            "rows": [_json_row(row) for row in rows],
        }
        print(json.dumps(report, indent=2))
    else:
        print_table(rows, load, args.quick, at)


if __name__ == "__main__":
    main()
