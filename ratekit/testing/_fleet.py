"""A workload driver: a scheduler driving the real `openai` client against the strict
provider, used by the end-to-end tests (tests/test_scheduler_e2e.py) and the benchmark
(bench/scheduler.py), in one process or as one process of a fleet sharing an account
through Redis. Needs the ``openai`` package.

``python -m ratekit.testing._fleet '<json config>'`` builds a `Scheduler` on a
`RedisBackend` (``url``, ``namespace``), prints ``ready``, reads the wall-clock
start instant (``time.time()`` seconds) from a line of stdin, pauses the shared
account until then (so that every task is queued when the window opens), and
submits ``calls`` chat completions from ``tasks`` tasks to ``base_url``. It then
prints one JSON line: ``{"results": n, "errors": [...], "events": {type: count}}``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import openai

import ratekit
from ratekit.testing.mock_provider import MockProvider

# Time compression: a provider minute lasts one real second.
SPEED = 60
PROVIDER = "moonshot"
TIER = "tier1"  # 200 RPM, 50 in flight, 2,000,000 TPM: the RPM binds
MODEL = "kimi-k2"
PROMPT = "Say hello."  # 3 tokens for the mock provider (ceil(10 / 4))
MAX_TOKENS = 50
# How long a call counts beyond its slice on the client: it must cover the wait between
# an admission and the request's arrival at the provider. Measured on 2 shared cores
# with client and provider on one machine: 5-15 ms typically, spikes to ~90 ms.
MARGIN_S = 0.1


def make_account(**overrides: Any) -> ratekit.Account:
    """The account under test, its periods compressed like the mock provider's."""
    options: dict[str, Any] = {"period_scale": 1 / SPEED, "margin_s": MARGIN_S, **overrides}
    return ratekit.Account(PROVIDER, tier=TIER, **options)


def provider_limits() -> ratekit.Limits:
    """The tier's own (uncompressed) numbers, for `MockProvider`."""
    return ratekit.load_profile(PROVIDER).tier(TIER).limits()


@dataclass
class Outcome:
    """What one run of calls came to: results returned, errors raised, events by type."""

    results: int = 0
    errors: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)

    def record(self, event: ratekit.Event) -> None:
        """A scheduler hook: count the event by its type's name."""
        self.events[type(event).__name__] += 1

    def as_json(self) -> dict[str, Any]:
        return {"results": self.results, "errors": self.errors, "events": dict(self.events)}


def chat_call(client: openai.AsyncOpenAI) -> Callable[[], Awaitable[Any]]:
    """One small chat completion; the model is bound here, as `submit` keeps its own
    ``model=`` keyword (the limiter group) and does not pass it on."""

    async def call() -> Any:
        return await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS
        )

    return call


def _total_tokens(response: Any) -> float:
    return float(response.usage.total_tokens)


async def drive(
    scheduler: ratekit.Scheduler,
    call: Callable[[], Awaitable[Any]],
    outcome: Outcome,
    *,
    calls: int,
    tasks: int,
) -> None:
    """Submit `calls` calls from `tasks` tasks; count results and errors into `outcome`."""
    left = calls
    tokens = 3 + MAX_TOKENS

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                result = await scheduler.submit(call, tokens=tokens, usage=_total_tokens)
            except Exception as exc:  # every lost call is reported, not raised
                outcome.errors.append(repr(exc))
            else:
                outcome.results += result is not None

    async with anyio.create_task_group() as group:
        for _ in range(tasks):
            group.start_soon(worker)


async def drive_wrapped(
    client: Any,
    outcome: Outcome,
    *,
    calls: int,
    tasks: int,
    stream: bool = False,
    prompt: str = PROMPT,
    max_tokens: int = MAX_TOKENS,
) -> None:
    """`calls` chat completions from `tasks` tasks through a `ratekit.wrap`ped client (with
    the SDK's own retry settings, as a user has them); results and errors into `outcome`."""
    left = calls
    messages = [{"role": "user", "content": prompt}]

    async def one() -> None:
        if stream:
            answer = await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=max_tokens, stream=True
            )
            async for _ in answer:
                pass
        else:
            await client.chat.completions.create(
                model=MODEL, messages=messages, max_tokens=max_tokens
            )

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                await one()
            except Exception as exc:  # every lost call is reported, not raised
                outcome.errors.append(repr(exc))
            else:
                outcome.results += 1

    async with anyio.create_task_group() as group:
        for _ in range(tasks):
            group.start_soon(worker)


async def warm_up(client: openai.AsyncOpenAI, connections: int) -> None:
    """Run the client's first chat completion against a throwaway provider (a cold first
    call takes tens of milliseconds more), then open `connections` keep-alive
    connections to `client`'s provider (``GET /v1/models`` counts in no window)."""
    async with MockProvider(ratekit.Limits(), speed=SPEED) as throwaway:
        cold = openai.AsyncOpenAI(base_url=throwaway.base_url, api_key="x", max_retries=0)
        try:
            await chat_call(cold)()
        finally:
            await cold.close()

    async def one() -> None:
        await client.models.list()

    async with anyio.create_task_group() as group:
        for _ in range(connections):
            group.start_soon(one)


async def _fleet_member(config: dict[str, Any]) -> Outcome:
    from ratekit.backends import Backend, MemoryBackend
    from ratekit.backends.redis import RedisBackend

    outcome = Outcome()
    # Without a Redis URL the member keeps the account in its own memory.
    backend: Backend = (
        MemoryBackend()
        if config.get("url") is None
        else RedisBackend(config["url"], namespace=config["namespace"])
    )
    if config.get("defaults"):
        # As a user writes it: the library's defaults, only time compressed.
        account = ratekit.Account(
            config.get("provider", PROVIDER),
            tier=config.get("tier", TIER),
            period_scale=1 / config["speed"],
            **config.get("overrides", {}),
        )
    else:
        account = make_account(
            margin_s=config.get("margin_s", MARGIN_S),
            pacing=config.get("pacing", False),
            period_scale=1 / config.get("speed", SPEED),
        )
    scheduler = ratekit.Scheduler(account, backend=backend, hooks=[outcome.record])
    # The SDK's own retries as a new user has them (2), or off.
    retries = openai.DEFAULT_MAX_RETRIES if config.get("defaults") else 0
    client = openai.AsyncOpenAI(base_url=config["base_url"], api_key="x", max_retries=retries)
    try:
        await warm_up(client, config["connections"])
        await scheduler.limiter().statistics()  # connected, scripts loaded
        print("ready", flush=True)
        start_at = float(await anyio.to_thread.run_sync(sys.stdin.readline))
        # Every task is queued behind the pause when the window opens.
        await scheduler.limiter().pause(max(start_at - time.time(), 0.0))
        with anyio.fail_after(config["timeout_s"]):
            if config.get("defaults"):
                await drive_wrapped(
                    ratekit.wrap(client, scheduler),
                    outcome,
                    calls=config["calls"],
                    tasks=config["tasks"],
                    stream=config.get("stream", False),
                    prompt=config.get("prompt", PROMPT),
                    max_tokens=config.get("max_tokens", MAX_TOKENS),
                )
            else:
                await drive(
                    scheduler,
                    chat_call(client),
                    outcome,
                    calls=config["calls"],
                    tasks=config["tasks"],
                )
    finally:
        await client.close()
        await backend.aclose()
    return outcome


def main() -> None:
    config = json.loads(sys.argv[1])
    outcome = asyncio.run(_fleet_member(config))
    print(json.dumps(outcome.as_json()), flush=True)


if __name__ == "__main__":
    main()
