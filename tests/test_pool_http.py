"""A pool's client end to end: the real `openai` package over HTTP to three strict local
providers, one per account, each enforcing its own tier.

Time is compressed 12 times on both sides (a minute lasts 5 s). The accounts are told
their provider's numbers and nothing else: the library's default margin, the SDK's
default retries.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import anyio
import openai
import pytest

from ratekit import Account, Limits, Pool, Scheduler
from ratekit.events import AccountOut, Admitted, Event, Settled
from ratekit.pools import Member
from ratekit.testing.mock_provider import MockProvider
from ratekit.testing.workload import binding_utilisation

pytestmark = pytest.mark.anyio

SPEED = 12
RPMS = {"kimi-a": 30, "kimi-b": 60, "relay": 90}
MESSAGES = [{"role": "user", "content": "Say hello."}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # the mock provider runs on asyncio


class Accounts:
    """Three strict providers and a pool of one account on each."""

    def __init__(self, stack: AsyncExitStack) -> None:
        self.stack = stack
        self.providers: dict[str, MockProvider] = {}
        self.events: list[Event] = []
        self.clients: list[openai.AsyncOpenAI] = []

    async def pool(self, **options: Any) -> Pool:
        members = {}
        for name, rpm in RPMS.items():
            provider = MockProvider(Limits(rpm=rpm), speed=SPEED, completion_tokens=8)
            self.providers[name] = await self.stack.enter_async_context(provider)
            # The SDK's defaults (two retries of its own), as a new user has them.
            client = openai.AsyncOpenAI(base_url=provider.base_url, api_key=f"key-{name}")
            self.clients.append(client)
            account = Account(
                "moonshot", tier="tier1", period_scale=1 / SPEED, rpm=rpm, tpm=None, tpd=None
            )
            members[name] = Member(Scheduler(account), client)

        def hook(event: Event) -> None:
            self.events.append(event)

        return Pool(members, hooks=[hook], **options)

    def used(self, name: str) -> float:
        """The steady-state share of its rpm that account `name`'s provider saw."""
        provider = self.providers[name]
        arrivals = [call.arrived_s for call in provider.calls]
        _, share = binding_utilisation(Limits(rpm=RPMS[name]).compressed(SPEED), arrivals, [])
        return share


@pytest.fixture
async def accounts() -> AsyncIterator[Accounts]:
    async with AsyncExitStack() as stack:
        made = Accounts(stack)
        yield made
        for client in made.clients:
            await client.close()


async def drive(pool: Pool, calls: int, tasks: int = 60) -> Counter[str]:
    """`calls` chat completions from `tasks` tasks through the pool's client; the
    account that served each, by its provider's answer."""
    client = pool.client()
    left = iter(range(calls))
    served: Counter[str] = Counter()

    async def worker() -> None:
        for _ in left:
            answer = await client.chat.completions.create(
                model="kimi-k2", messages=MESSAGES, max_tokens=8
            )
            served[answer.id.split("mock")[0]] += 1

    async with anyio.create_task_group() as group:
        for _ in range(tasks):
            group.start_soon(worker)
    return served


async def test_a_pool_of_three_accounts_fills_the_sum_of_their_limits(
    accounts: Accounts,
) -> None:
    """540 calls through one pool client: every account's provider is kept at >= 95 % of
    its rpm in the steady state, with no 429 anywhere, and the calls split 1:2:3 like
    the accounts' limits."""
    pool = await accounts.pool()
    started = anyio.current_time()
    await drive(pool, 540)
    elapsed = anyio.current_time() - started
    shares = {name: accounts.used(name) for name in RPMS}
    served = {name: len(provider.calls) for name, provider in accounts.providers.items()}
    print(f"\npool of 3: {served} in {elapsed:.1f} s, steady state {shares}")
    for name, provider in accounts.providers.items():
        assert provider.statistics().rejected == {}, name
    assert sum(served.values()) == 540
    for name, share in shares.items():
        assert share >= 0.95, (name, share)
    # 540 calls at 180 a minute (15 a second here) take three minutes: 15 s.
    assert elapsed < 15 * 1.25
    settled = Counter(e.account for e in accounts.events if isinstance(e, Settled))
    assert settled == served


async def test_an_account_whose_quota_is_spent_is_left_within_one_call(
    accounts: Accounts,
) -> None:
    """Mid-run, one account's provider starts answering "insufficient quota": only the
    calls admitted there before its first such answer came back reach it (each is
    retried on another account); nothing is admitted there afterwards, and the other two
    keep their own rates with no 429; the run completes."""
    pool = await accounts.pool(out_s=600)
    await drive(pool, 90)
    spent = accounts.providers["kimi-b"]
    before = len(spent.calls)
    spent.spend_quota()
    mark = len(accounts.events)
    served = await drive(pool, 270)
    events = accounts.events[mark:]
    out_at = next(i for i, e in enumerate(events) if isinstance(e, AccountOut))
    sent_before = [e for e in events[:out_at] if isinstance(e, Admitted) and e.account == "kimi-b"]
    sent_after = [e for e in events[out_at:] if isinstance(e, Admitted) and e.account == "kimi-b"]
    print(f"\n{len(sent_before)} calls were admitted on the spent account before its answer")
    assert sent_after == []
    assert spent.statistics().rejected == {"quota": len(sent_before)}
    assert len(spent.calls) == before
    for name in ("kimi-a", "relay"):
        assert accounts.providers[name].statistics().rejected == {}, name
    assert sum(served.values()) == 270
    out = [e for e in accounts.events if isinstance(e, AccountOut)]
    assert [e.account for e in out] == ["kimi-b"]
    assert pool.statistics().accounts["kimi-b"].exhausted == 1
    # The other two went on at their own rates: 120 a minute together.
    shares = {name: accounts.used(name) for name in ("kimi-a", "relay")}
    print(f"\nafter kimi-b's quota was spent: steady state {shares}")
    for name, share in shares.items():
        assert math.isnan(share) or share >= 0.9, (name, share)


async def test_an_account_answering_429_is_avoided_within_one_call(
    accounts: Accounts,
) -> None:
    """The first account's provider answers 429 (Retry-After 10 s, two compressed
    minutes) to one call: that call is retried on the next account at once, and the
    first takes nothing more while its Retry-After lasts."""
    pool = await accounts.pool()
    answering = accounts.providers["kimi-a"]
    answering.inject_429s(1, retry_after_s=10)
    client = pool.client()
    started = anyio.current_time()
    for _ in range(20):
        await client.chat.completions.create(model="kimi-k2", messages=MESSAGES, max_tokens=8)
    assert anyio.current_time() - started < 5
    assert answering.statistics().rejected == {"injected": 1}
    assert pool.statistics().accounts["kimi-a"].rate_limited == 1
    served = {name: len(p.calls) for name, p in accounts.providers.items()}
    assert served == {"kimi-a": 0, "kimi-b": 20, "relay": 0}
