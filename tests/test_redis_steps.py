"""The settles and reserves of one account sent as one step (step.lua, `_steps`): order
and cancellation."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from ratekit import Limits
from ratekit.backends import Demand
from ratekit.backends.redis import _BATCH, RedisBackend, RedisGrant
from ratekit.clock import Instant

from .redis_server import RedisServer

pytestmark = pytest.mark.anyio
ONE = Demand(1, 0, 0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def now() -> Instant:
    return Instant(time.monotonic(), time.time())


async def test_a_reserve_joined_with_a_later_settle_keeps_its_place_among_reserves(
    redis_server: RedisServer,
) -> None:
    """Reserves queued before a settle of their account keep their order: a caller that
    came later is not admitted while one that came before it is refused."""
    backend = RedisBackend(redis_server.url, namespace=uuid.uuid4().hex)
    limits = Limits(concurrency=_BATCH + 1)
    held = [await backend.reserve(limits, ONE, now()) for _ in range(2)]
    assert all(isinstance(grant, RedisGrant) for grant in held)
    at = now()
    # A burst: the first _BATCH callers share one reserve run, the last one another;
    # then a settle of the account is posted; one sender takes all three.
    burst = [backend.reserve(limits, ONE, at) for _ in range(_BATCH + 1)]
    results = await asyncio.gather(*burst, backend.settle(limits, held[0], ONE, at))
    outcomes = results[:-1]
    admitted = [isinstance(outcome, RedisGrant) for outcome in outcomes]
    first_refused = admitted.index(False)
    assert not any(admitted[first_refused:]), (first_refused, admitted[first_refused:])
    await backend.aclose()


async def test_a_reserve_caller_that_left_during_a_step_hands_its_grant_back(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ratekit.backends import redis as module

    backend = RedisBackend(redis_server.url, namespace=uuid.uuid4().hex)
    limits = Limits(concurrency=1, rpm=100)
    grant = await backend.reserve(limits, ONE, now())
    assert isinstance(grant, RedisGrant)
    real = module._exchange
    written = asyncio.Event()
    steps = []

    async def exchange(connection, commands):  # type: ignore[no-untyped-def]
        steps.extend(c for c in commands if "step" in " ".join(map(str, c)))
        task = asyncio.ensure_future(real(connection, commands))
        await asyncio.sleep(0.05)
        written.set()
        return await task

    monkeypatch.setattr(module, "_exchange", exchange)
    caller = asyncio.ensure_future(backend.reserve(limits, ONE, now()))
    await backend.settle(limits, grant, ONE, now())  # one sender takes both
    await written.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    monkeypatch.setattr(module, "_exchange", real)
    assert steps
    await asyncio.sleep(0.1)
    await backend.drain()
    stats = {d.name: d.used for d in await backend.statistics(limits, now())}
    assert stats["concurrency"] == 0, stats
    again = await backend.reserve(limits, ONE, now())
    assert isinstance(again, RedisGrant)
    await backend.aclose()
