"""The settles and reserves of one account sent as one step (step.lua, `_steps`): order
and cancellation."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from typing import Any

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


def _spec(
    unit: str, limit: float, period_s: int, slices: int, margin_s: float, paced: int, take: int = 0
) -> str:
    """One window's spec as the backend packs it (see parse_specs in _window.lua); `take`
    0 records at admission, 1 and 2 hold until settled."""
    position = {"requests": 0, "tokens": 1, "money": 2}[unit]
    return (
        f"{unit}:{period_s}:{slices}: {float(limit)} {float(period_s)} {period_s / slices} "
        f"{margin_s} {paced} {take} {position} -"
    )


def _counted_library() -> tuple[str, str]:
    """The shipped library with one line more: a step that took the quick way counts
    itself (INCR of "<key>:quick"). Its own name, so it loads beside the shipped one."""
    anchor = "local answer = quick_step(KEYS, ARGV)\n"
    assert LIBRARY.text.count(anchor) == 1
    text = LIBRARY.text.replace(
        anchor, anchor + "if answer then redis.call('INCR', KEYS[1] .. ':quick') end\n"
    ).replace(LIBRARY.name, "ratekit_counted")
    return text, "ratekit_counted"


class _ThreeWays:
    """One account's calls run three ways, each on a key of its own: by the step script
    (`a`), by settle.lua then reserve.lua (`b`), and by the counted copy of the step
    (`c`, see `_counted_library`); each call checks the three replies, states and ttls
    alike. Releases are told on a channel per way (`told`)."""

    def __init__(self, client: Any, run: str, name: str) -> None:
        self.client = client
        self.run = run
        self.keys = [f"{{{run}:{name}}}:{way}" for way in "abc"]
        self.steps = 0

    def _check(self, replies: list[Any], where: object) -> Any:
        client = self.client
        assert replies[0] == replies[1] == replies[2], (where, replies)
        states = [client.hgetall(key) for key in self.keys]
        assert states[0] == states[1] == states[2], (where, states)
        assert abs(client.pttl(self.keys[0]) - client.pttl(self.keys[1])) < 100, where
        return replies[0]

    def reserve(self, begins: list[str], where: object = None) -> Any:
        shipped, counted = LIBRARY.name, "ratekit_counted"
        replies = [
            self.client.execute_command("FCALL", f"{name}_reserve", 1, key, *begins)
            for name, key in zip((shipped, shipped, counted), self.keys, strict=True)
        ]
        return self._check(replies, where)

    def step(self, ends: list[str], begins: list[str], where: object = None) -> Any:
        """The settle `ends` (its channel argument "CHANNEL") and the reserve `begins`."""

        def told(way: str, args: list[str]) -> list[str]:
            return [f"{self.run}:{way}" if arg == "CHANNEL" else arg for arg in args]

        client, (stepped, apart, quick) = self.client, self.keys
        shipped, counted = LIBRARY.name, "ratekit_counted"
        step = ["11", *ends, *begins]
        replies = [
            client.execute_command("FCALL", f"{shipped}_step", 1, stepped, *told("a", step)),
            [
                client.execute_command("FCALL", f"{shipped}_settle", 1, apart, *told("b", ends)),
                client.execute_command("FCALL", f"{shipped}_reserve", 1, apart, *begins),
            ],
            client.execute_command("FCALL", f"{counted}_step", 1, quick, *told("c", step)),
        ]
        self.steps += 1
        return self._check(replies, where)

    def quick_steps(self) -> int:
        return int(self.client.get(f"{self.keys[2]}:quick") or 0)


@pytest.fixture
def three_ways(redis_server: RedisServer) -> Iterator[tuple[Any, str]]:
    """A client of the server with the shipped and the counted library loaded, a run id,
    and everything told on the run's channels (a list filled by `heard`)."""
    import redis as sync_redis

    client = sync_redis.Redis.from_url(redis_server.url)
    client.execute_command("FUNCTION", "LOAD", "REPLACE", LIBRARY.text)
    client.execute_command("FUNCTION", "LOAD", "REPLACE", _counted_library()[0])
    yield client, uuid.uuid4().hex[:8]
    client.close()


def _heard(client: Any, run: str, listener: Any) -> dict[str, list[bytes]]:
    """What `listener` (subscribed to the run's channels) heard, by way."""
    heard: dict[str, list[bytes]] = {way: [] for way in "abc"}
    while (message := listener.get_message(timeout=0.5)) is not None:
        if message["type"] == "pmessage":
            heard[message["channel"].decode().rsplit(":", 1)[1]].append(message["data"])
    return heard


def test_a_step_ends_and_admits_as_a_settle_then_a_reserve_at_its_instant(
    three_ways: tuple[Any, str],
) -> None:
    """The step script, its quick way included, leaves the state, its ttl and the replies
    exactly as settle.lua then reserve.lua sent back to back at the same instant:
    random runs of calls (concurrency caps, one to four windows of requests, tokens
    and money, pacing, holds until settled, lapsing leases, refunds, usage that
    differs, slices that expire, refusals, a cap lowered below the calls in flight,
    limits that change, two calls ended or admitted at once, pauses, waiting callers,
    a wall clock apart from the monotonic one, a reading older than the last),
    releases told on the channel alike; and the quick way is taken in a good share of
    those steps (the counted copy counts)."""
    import random

    client, run = three_ways
    listener = client.pubsub()
    listener.psubscribe(f"{run}:*")
    steps = taken = 0
    for seed in range(60):
        rnd = random.Random(seed)
        # Each window: unit, limit, period (s), slices, margin (s), paces, take.
        windows: list[tuple[str, float, int, int, float, int, int]] = [
            (
                "requests",
                rnd.choice([3, 5, 1000]),
                rnd.choice([1, 2, 60]),
                rnd.choice([1, 2, 4]),
                rnd.choice([0.0, 0.5]),
                rnd.choice([0, 0, 1]),
                0,
            )
        ]
        if rnd.random() < 0.5:
            windows.append(
                ("tokens", rnd.choice([50, 100_000]), 1, 2, 0.0, 0, rnd.choice([0, 1, 2]))
            )
        if rnd.random() < 0.5:
            windows.append(("tokens", rnd.choice([80, 10**6]), 8, 4, 0.0, 0, 2))
        if rnd.random() < 0.3:
            windows.append(("money", rnd.choice([0.5, 1000.0]), 4, 2, 0.0, 0, rnd.choice([0, 2])))
        specs = [_spec(*window) for window in windows]
        packed = "|".join(specs)
        # The same windows under twice the limits (an account whose tier changed).
        changed = "|".join(_spec(unit, 2 * limit, *rest) for unit, limit, *rest in windows)
        cap = rnd.choice(["", "1", "2", "3", "1000"])
        lease_ttl = rnd.choice(["0.5", "10.0"])
        ways = _ThreeWays(client, run, str(seed))
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
            if rnd.random() < 0.04:
                # A 429 paused the account, or a caller waits.
                field, until = rnd.choice(["cool", "wait"]), repr(at + rnd.random())
                for key in ways.keys:
                    client.hset(key, field, until)
            # A reading older than the last now and then (calls of one process that reach
            # the server out of order); the wall clock apart from the monotonic one.
            reading = at - 0.3 if rnd.random() < 0.05 else at
            clock = f"{reading!r} {reading + 5000.25!r}"
            cost = rnd.choice(["0", "0.0125", "0.3"])
            demand = f"1 {rnd.choice([0, 10, 30])} {cost}"
            two = rnd.random() < 0.1  # two calls admitted by one reserve
            leases = [f"L{i}", f"M{i}"] if two else [rnd.choice([f"L{i}", f"L{i}", "-"])]
            begins = [
                clock,
                "81000",
                cap,
                " ".join(leases),
                lease_ttl,
                changed if rnd.random() < 0.05 else packed,
                "|".join([demand] * len(leases)),
            ]
            if not live or rnd.random() < 0.2:
                reply = ways.reserve(begins, (seed, i))
            else:
                ended = []
                for _ in range(2 if len(live) > 1 and rnd.random() < 0.1 else 1):
                    # Often the oldest: the lease that lapses first ends.
                    oldest = rnd.random() < 0.5
                    ended.append(live.pop(0 if oldest else rnd.randrange(len(live))))
                ends = [clock, "81000", "|".join(lease for lease, _, _ in ended), "CHANNEL"]
                ends += [
                    "|".join(values)
                    for values in zip(
                        *(
                            (
                                "1" if rnd.random() < 0.1 else "0",
                                reserved,
                                reserved
                                if rnd.random() < 0.6
                                else f"1 {rnd.choice([0, 5, 25, 40])} {rnd.choice(['0', '0.2'])}",
                                slices,
                                "" if rnd.random() < 0.9 else "7",
                                "-" if rnd.random() < 0.9 else repr(at - 0.5),
                            )
                            for _, slices, reserved in ended
                        ),
                        strict=True,
                    )
                ]
                ends.insert(5, packed)  # settle.lua's arguments in their order
                reply = ways.step(ends, begins, (seed, i))[1]
            width = len(specs)
            for j in range(int(reply[0])):
                if leases[j] != "-":
                    indexes = reply[2 + j * width : 2 + (j + 1) * width]
                    live.append((leases[j], " ".join(x.decode() for x in indexes), demand))
        steps += ways.steps
        taken += ways.quick_steps()
    heard = _heard(client, run, listener)
    listener.close()
    assert heard["a"] == heard["b"] == heard["c"], {way: len(told) for way, told in heard.items()}
    assert len(heard["a"]) > 100, len(heard["a"])
    # The runs are seeded: the same steps each time (measured: 93 of 1,240 go the quick
    # way, the rest meet something the quick way leaves to the scripts).
    assert steps > 1_000, steps
    assert taken > 80, (taken, steps)


# One window of tokens held "safe" until settled, for the scripted cases below: what a
# call of 30 tokens begins with, and what ends it having used `used`.
_HELD = _spec("tokens", 10**6, 8, 4, 0.0, 0, take=2)


def _held_begins(at: float, lease: str) -> list[str]:
    return [f"{at!r} {at!r}", "81000", "", lease, "10.0", _HELD, "1 30 0"]


def _held_ends(at: float, lease: str, slices: bytes, used: int) -> list[str]:
    settle = [f"{at!r} {at!r}", "81000", lease, "CHANNEL", "0", _HELD, "1 30 0"]
    return [*settle, f"1 {used} 0", slices.decode(), "", "-"]


def test_a_quick_step_counts_a_held_calls_rest_in_its_older_slice(
    three_ways: tuple[Any, str],
) -> None:
    """A call held on a window until settled, and settled in a later slice than its
    admission's while a newer slice holds amounts: what it reserved beyond its usage is
    added to its admission's slice (read, with what other calls counted there), its
    usage to the newest; the quick way as the scripts."""
    client, run = three_ways
    ways = _ThreeWays(client, run, "held")
    a = ways.reserve(_held_begins(1000.0, "A"))[2]
    b = ways.reserve(_held_begins(1000.1, "B"))[2]
    c = ways.step(_held_ends(1000.5, "B", b, 10), _held_begins(1000.5, "C"))[1][2]
    ways.step(_held_ends(1002.5, "C", c, 10), _held_begins(1002.5, "D"))
    ways.step(_held_ends(1002.6, "A", a, 5), _held_begins(1002.6, "E"))
    assert ways.quick_steps() == 3
    state = client.hgetall(ways.keys[0])
    # Slice 500: B's 10 and 20 more, C's 20 more, A's 25 more; slice 501: C's and A's usage.
    assert state[b"tokens:8:4:|500"] == b"75", state
    assert state[b"tokens:8:4:|501"] == b"15", state


def test_a_quick_step_counts_a_held_calls_rest_below_the_oldest_slice(
    three_ways: tuple[Any, str],
) -> None:
    """Two calls held in one slice; the first to end uses all it reserved, in a later
    slice, which becomes the oldest with an amount; the other ends using less: the rest
    of its reservation goes back to its admission's slice, now the oldest again."""
    client, run = three_ways
    ways = _ThreeWays(client, run, "below")
    a = ways.reserve(_held_begins(1000.0, "A"))[2]
    b = ways.reserve(_held_begins(1000.1, "B"))[2]
    ways.step(_held_ends(1002.5, "B", b, 30), _held_begins(1002.5, "C"))
    assert client.hget(ways.keys[0], "tokens:8:4:|lo") == b"501"
    ways.step(_held_ends(1002.6, "A", a, 5), _held_begins(1002.6, "D"))
    assert ways.quick_steps() == 2
    state = client.hgetall(ways.keys[0])
    assert state[b"tokens:8:4:|lo"] == b"500", state
    assert state[b"tokens:8:4:|500"] == b"25", state


@pytest.mark.parametrize(
    "case",
    ["paused", "limits changed", "two ended", "a credit", "two admitted", "a tab in an id"],
)
def test_a_step_the_quick_way_does_not_serve_runs_the_scripts(
    three_ways: tuple[Any, str], case: str
) -> None:
    """A step with something the quick way leaves to the scripts (the account paused by
    a 429, other limits for the next call, two calls ended or admitted at once, a
    credit, a lease id that reserve.lua reads as two) runs the scripts, with their
    result; everything else about it would go the quick way."""
    client, run = three_ways
    ways = _ThreeWays(client, run, case.replace(" ", "-"))
    packed = _spec("requests", 1000, 60, 60, 0.0, 0)
    other = _spec("requests", 2000, 60, 60, 0.0, 0)
    at = f"{1000.5!r} {1000.5!r}"

    def begins(leases: str, specs: str = packed, demands: str = "1 0 0") -> list[str]:
        return [at, "81000", "10", leases, "10.0", specs, demands]

    admitted = [ways.reserve([f"{1000.0!r} {1000.0!r}", *begins(lease)[1:]]) for lease in "AB"]
    slices = [reply[2].decode() for reply in admitted]
    ends = [at, "81000", "A", "CHANNEL", "0", packed, "1 0 0", "1 0 0", slices[0], "", "-"]
    if case == "paused":
        for key in ways.keys:
            client.hset(key, "cool", repr(1001.0))
    if case == "two ended":
        ends = [at, "81000", "A|B", "CHANNEL", "0|0", packed, "1 0 0|1 0 0", "1 0 0|1 0 0"]
        ends += [f"{slices[0]}|{slices[1]}", "|", "-|-"]
    nexts = {
        "paused": begins("C"),
        "limits changed": begins("C", other),
        "two ended": begins("C"),
        "a credit": begins("+"),
        "two admitted": begins("C D", demands="1 0 0|1 0 0"),
        "a tab in an id": begins("C\tD", demands="1 0 0"),
    }[case]
    ways.step(ends, nexts)
    assert ways.quick_steps() == 0


def test_a_quick_step_frees_a_hold_that_float_drift_leaves_above_zero(
    three_ways: tuple[Any, str],
) -> None:
    """Money held by two calls (0.1 and 0.2) and freed by their ends leaves a drift of
    about 4e-17: zero, as the scripts count it, the quick way alike."""
    client, run = three_ways
    ways = _ThreeWays(client, run, "drift")
    packed = _spec("money", 1.0, 4, 2, 0.0, 0, take=2)

    def begins(at: float, lease: str, cost: str) -> list[str]:
        return [f"{at!r} {at!r}", "81000", "", lease, "10.0", packed, f"1 0 {cost}"]

    def ends(at: float, lease: str, slices: bytes, cost: str) -> list[str]:
        settle = [f"{at!r} {at!r}", "81000", lease, "CHANNEL", "0", packed, f"1 0 {cost}"]
        return [*settle, "1 0 0", slices.decode(), "", "-"]

    a = ways.reserve(begins(1000.0, "A", "0.1"))[2]
    b = ways.reserve(begins(1000.1, "B", "0.2"))[2]
    ways.step(ends(1000.2, "A", a, "0.1"), begins(1000.2, "C", "0"))
    ways.step(ends(1000.3, "B", b, "0.2"), begins(1000.3, "D", "0"))
    assert ways.quick_steps() == 2
    assert client.hget(ways.keys[0], "money:4:2:|h") == b"0"


def test_a_step_under_a_cap_lowered_below_the_calls_in_flight_refuses_the_next(
    three_ways: tuple[Any, str],
) -> None:
    """The account's tier drops while three calls run: the cap is now 2. One of them
    ends; the next call is refused (two still run), the quick way as the scripts."""
    client, run = three_ways
    ways = _ThreeWays(client, run, "cap")
    packed = _spec("requests", 1000, 60, 60, 0.0, 0)

    def begins(at: float, lease: str, cap: str) -> list[str]:
        return [f"{at!r} {at!r}", "81000", cap, lease, "10.0", packed, "1 0 0"]

    slices = [ways.reserve(begins(1000.0 + k / 10, lease, "3"))[2] for k, lease in enumerate("ABC")]
    ended = [f"{1000.5!r} {1000.5!r}", "81000", "A", "CHANNEL", "0", packed, "1 0 0", "1 0 0"]
    reply = ways.step([*ended, slices[0].decode(), "", "-"], begins(1000.5, "D", "2"))
    assert reply[1][0] == 0, reply  # refused: two calls run under a cap of 2
    assert ways.quick_steps() == 0


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
