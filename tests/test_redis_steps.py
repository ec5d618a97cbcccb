"""The settles and reserves of one account sent as one step (step.lua, `_steps`): order
and cancellation."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from ratekit import Limits
from ratekit.backends import Demand
from ratekit.backends._scripts import LIBRARY
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


def _spec(unit: str, limit: float, period_s: int, slices: int, margin_s: float, paced: int) -> str:
    """One window's spec as the backend packs it (see parse_specs in _window.lua)."""
    position = {"requests": 0, "tokens": 1}[unit]
    return (
        f"{unit}:{period_s}:{slices}: {float(limit)} {float(period_s)} {period_s / slices} "
        f"{margin_s} {paced} 0 {position} -"
    )


def _counted_library() -> tuple[str, str]:
    """The shipped library with one line more: a step that took the quick way counts
    itself (INCR of "<key>:quick"). Its own name, so it loads beside the shipped one."""
    anchor = "local answer = quick()\n"
    assert LIBRARY.text.count(anchor) == 1
    text = LIBRARY.text.replace(
        anchor, anchor + "if answer then redis.call('INCR', KEYS[1] .. ':quick') end\n"
    ).replace(LIBRARY.name, "ratekit_counted")
    return text, "ratekit_counted"


def test_a_step_ends_and_admits_as_a_settle_then_a_reserve_at_its_instant(
    redis_server: RedisServer,
) -> None:
    """The step script, its quick way included, leaves the state, its ttl and the replies
    exactly as settle.lua then reserve.lua sent back to back at the same instant:
    random runs of calls (concurrency caps, one or two windows, pacing, lapsing leases,
    refunds, usage that differs, slices that expire, refusals, a cap lowered below
    the calls in flight), releases told on the channel alike; and the quick way is taken
    in a good share of those steps (an instrumented copy of the library counts)."""
    import random

    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    text, counted = _counted_library()
    client.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY.text)
    client.execute_command("FUNCTION", "LOAD", "REPLACE", text)
    shipped = LIBRARY.name
    run = uuid.uuid4().hex[:8]
    listener = client.pubsub()
    listener.psubscribe(f"{run}:*")
    steps = 0
    for seed in range(60):
        rnd = random.Random(seed)
        specs = [
            _spec(
                "requests",
                rnd.choice([3, 5, 1000]),
                rnd.choice([1, 2, 60]),
                rnd.choice([1, 2, 4]),
                rnd.choice([0.0, 0.5]),
                rnd.choice([0, 0, 1]),
            )
        ]
        if rnd.random() < 0.5:
            specs.append(_spec("tokens", rnd.choice([50, 100_000]), 1, 2, 0.0, 0))
        packed = "|".join(specs)
        cap = rnd.choice(["", "1", "2", "3", "1000"])
        lease_ttl = rnd.choice(["0.5", "10.0"])
        stepped, apart, quick = (f"{{{run}:{seed}}}:{name}" for name in ("a", "b", "c"))
        at = 1000.0 + rnd.random()
        live: list[tuple[str, str, str]] = []
        for i in range(60):
            at += rnd.choice([0.0, 0.001, 0.1, 0.3, 0.7, 1.3])
            if rnd.random() < 0.15:
                at = float(int(at) + 1)  # on a slice's edge, where slices stop counting
            if rnd.random() < 0.3:
                lease_ttl = rnd.choice(["0.5", "3.0", "10.0"])  # later leases lapse sooner
            if rnd.random() < 0.1:
                cap = rnd.choice(["", "1", "2", "3"])  # the account's tier changed
            clock = f"{at!r} {at!r}"
            demand = f"1 {rnd.choice([0, 10, 30])} 0"
            lease = rnd.choice([f"L{i}", f"L{i}", "-"])
            begins = [clock, "81000", cap, lease, lease_ttl, packed, demand]
            if not live or rnd.random() < 0.2:
                replies = [
                    client.execute_command("FCALL", f"{name}_reserve", 1, key, *begins)
                    for name, key in ((shipped, stepped), (shipped, apart), (counted, quick))
                ]
            else:
                # Often the oldest: the lease that lapses first ends.
                oldest = rnd.random() < 0.5
                ended, slices, reserved = live.pop(0 if oldest else rnd.randrange(len(live)))
                used = reserved if rnd.random() < 0.8 else f"1 {rnd.choice([0, 5])} 0"
                ends = [
                    clock,
                    "81000",
                    ended,
                    "CHANNEL",
                    "1" if rnd.random() < 0.1 else "0",
                    packed,
                    reserved,
                    used,
                    slices,
                    "" if rnd.random() < 0.9 else "7",
                    "-" if rnd.random() < 0.9 else repr(at - 0.5),
                ]

                # Each run tells its releases on a channel of its own.
                def told(where: str, args: list[str]) -> list[str]:
                    return [f"{run}:{where}" if arg == "CHANNEL" else arg for arg in args]

                step = ["11", *ends, *begins]
                replies = [
                    client.execute_command(
                        "FCALL", f"{shipped}_step", 1, stepped, *told("a", step)
                    ),
                    [
                        client.execute_command(
                            "FCALL", f"{shipped}_settle", 1, apart, *told("b", ends)
                        ),
                        client.execute_command("FCALL", f"{shipped}_reserve", 1, apart, *begins),
                    ],
                    client.execute_command("FCALL", f"{counted}_step", 1, quick, *told("c", step)),
                ]
                steps += 1
            assert replies[0] == replies[1] == replies[2], (seed, i, replies)
            state = client.hgetall(stepped)
            assert state == client.hgetall(apart) == client.hgetall(quick), (seed, i)
            assert abs(client.pttl(stepped) - client.pttl(apart)) < 1_000, (seed, i)
            admitted = replies[0][1] if len(replies[0]) == 2 else replies[0]
            if int(admitted[0]) == 1 and lease != "-":
                indexes = " ".join(index.decode() for index in admitted[2 : 2 + len(specs)])
                live.append((lease, indexes, demand))
    # The same releases told (a caller waits on them) on each run's channel.
    heard: dict[bytes, list[bytes]] = {}
    while (message := listener.get_message(timeout=0.5)) is not None:
        if message["type"] == "pmessage":
            heard.setdefault(message["channel"], []).append(message["data"])
    told_a, told_b, told_c = (heard.get(f"{run}:{where}".encode(), []) for where in "abc")
    assert told_a == told_b == told_c, (len(told_a), len(told_b), len(told_c))
    assert len(told_a) > 100, len(told_a)
    listener.close()
    taken = sum(int(value) for value in client.mget(client.keys(f"{{{run}:*}}:c:quick")) if value)
    # About a quarter of these steps qualify (measured: 309 of 1,348).
    assert steps > 1_000, steps
    assert taken > steps // 8, (taken, steps)
    client.close()


def test_a_quick_step_on_a_server_clock_that_stepped_back_keeps_the_offset(
    redis_server: RedisServer,
) -> None:
    """On the server's TIME (clock argument ""), a step whose clock reading falls behind
    the account's last one (TIME stepped back) adds the step to the account's offset,
    the quick way as the scripts: the account's clock runs on from where it was."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    text, counted = _counted_library()
    client.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY.text)
    client.execute_command("FUNCTION", "LOAD", "REPLACE", text)
    shipped = LIBRARY.name
    packed = _spec("requests", 1000, 3600, 36, 0.0, 0)  # no slice stops counting in 100 s
    run = uuid.uuid4().hex[:8]
    stepped, apart = f"{{{run}}}:a", f"{{{run}}}:b"
    states = []
    for key, step in ((stepped, True), (apart, False)):
        begins = ["", "81000", "10", "L0", "10.0", packed, "1 0 0"]
        reply = client.execute_command("FCALL", f"{shipped}_reserve", 1, key, *begins)
        # The account's clock read 100 s ahead of TIME: as if TIME then stepped back.
        client.hset(key, "raw", float(client.hget(key, "raw") or 0) + 100)
        ends = ["", "81000", "L0", "released", "0", packed, "1 0 0", "1 0 0", reply[2], "", "-"]
        begins = ["", "81000", "10", "L1", "10.0", packed, "1 0 0"]
        if step:
            client.execute_command("FCALL", f"{counted}_step", 1, key, "11", *ends, *begins)
        else:
            client.execute_command("FCALL", f"{shipped}_settle", 1, key, *ends)
            client.execute_command("FCALL", f"{shipped}_reserve", 1, key, *begins)
        states.append({k.decode(): v.decode() for k, v in client.hgetall(key).items()})
    quick, scripts = states
    assert client.get(f"{stepped}:quick") == b"1"  # the quick way ran
    assert set(quick) == set(scripts), set(quick) ^ set(scripts)
    assert 99.9 < float(quick["off"]) < 100.1, quick
    assert abs(float(quick["off"]) - float(scripts["off"])) < 0.05, (quick, scripts)
    assert abs(float(quick["raw"]) - float(scripts["raw"])) < 0.05, (quick, scripts)
    client.close()
