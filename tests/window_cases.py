"""One table of window cases that every backend must pass, at fixed instants.

Each case is a `Limits` and a list of steps at times relative to `BASE_S`. The
memory backend runs them through its synchronous core; a backend with its own
copy of the math (the Redis Lua scripts) runs the very same table, so the two
cannot drift.

Steps:
- ``Reserve(t, grant, requests, tokens, cost, wait_s=..., dimension=...)``: with
  ``wait_s=None`` the demand must be admitted and is remembered as `grant`;
  otherwise it must be refused with exactly that wait (``inf``: only a release
  helps) on that dimension.
- ``Sent(t, grant)``: the call's request leaves now; what it recorded counts from
  now (`restamp`). A call never said to leave counts what it recorded from its end
  (its settle), when the request had arrived at the latest.
- ``Settle(t, grant, tokens, cost)``: the call's real usage; ``Refund(t, grant)``.
- ``Used(t, dimension, amount, in_flight)``: what the statistics say.
- ``Pause(t, seconds, lasts_s, out=False)``: a provider's cooldown (with `out`: the
  account taken out, its quota spent); the pause then in force lasts `lasts_s` (a
  longer one already in force stands).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ratekit import Limits, Rate, TokenCounting

# An instant that is a whole number of every slice width used below, and noon UTC
# on 2026-11-25 (8 pm in Asia/Shanghai) for the calendar-day cases.
BASE_S = 1_795_608_000.0
INF = math.inf


@dataclass(frozen=True)
class Reserve:
    t: float
    grant: str = ""
    requests: float = 1
    tokens: float = 0
    cost: float = 0
    wait_s: float | None = None
    dimension: str = ""


@dataclass(frozen=True)
class Settle:
    t: float
    grant: str
    tokens: float | None = None
    cost: float | None = None


@dataclass(frozen=True)
class Refund:
    t: float
    grant: str


@dataclass(frozen=True)
class Sent:
    t: float
    grant: str


@dataclass(frozen=True)
class Used:
    t: float
    dimension: str
    amount: float
    in_flight: float = 0


@dataclass(frozen=True)
class Pause:
    t: float
    seconds: float
    lasts_s: float
    out: bool = False


Step = Reserve | Sent | Settle | Refund | Used | Pause


@dataclass(frozen=True)
class Case:
    name: str
    limits: Limits
    steps: list[Step] = field(default_factory=list)


def _tokens(mode: TokenCounting, **kwargs: object) -> Limits:
    return Limits(tpm=1000, token_counting=mode, **kwargs)  # type: ignore[arg-type]


CASES: list[Case] = [
    Case(
        "rpm: a full window refuses until its oldest slice ends plus the period",
        Limits(rpm=3),
        [
            Reserve(0.0, "a"),
            Reserve(0.5, "b"),
            Reserve(10.2, "c"),
            # Slice 0 (a, b) ends at 1 s and counts until 61 s.
            Reserve(10.3, wait_s=50.7, dimension="rpm"),
            Used(10.3, "rpm", 3),
            Reserve(60.999, wait_s=0.001, dimension="rpm"),
            Reserve(61.0, "d"),
            Reserve(61.0, "e"),
            # Now slice 10 (c) is the oldest: it counts until 71 s.
            Reserve(61.0, wait_s=10.0, dimension="rpm"),
            Used(71.0, "rpm", 2),
        ],
    ),
    Case(
        "rpm: a refusal needs as many old slices as the excess, not just the oldest",
        Limits(rpm=4),
        [
            Reserve(0.0, "a"),
            Reserve(5.0, "b"),
            Reserve(9.0, "c", requests=2),
            # 3 requests must go: slices 0 and 5 free 2, slice 9 frees the rest at 70 s.
            Reserve(20.0, requests=3, wait_s=50.0, dimension="rpm"),
            Reserve(66.0, "d", requests=2),
        ],
    ),
    Case(
        "rpm: a refund gives back its own slice's amount once",
        Limits(rpm=3),
        [
            Reserve(0.0, "a"),
            Reserve(1.0, "b"),
            Refund(2.0, "a"),
            Used(2.0, "rpm", 1),
            Reserve(3.0, "c"),
            Reserve(4.0, "d"),
            # Slice 0 is empty after the refund; slice 1 (b) is next to go, at 62 s.
            Reserve(5.0, wait_s=57.0, dimension="rpm"),
        ],
    ),
    Case(
        "margin: every admission counts margin_s longer",
        Limits(rpm=2, margin_s=2.0),
        [
            Reserve(0.0, "a"),
            Reserve(0.0, "b"),
            Reserve(0.0, wait_s=63.0, dimension="rpm"),
            Reserve(62.5, wait_s=0.5, dimension="rpm"),
            Reserve(63.0, "c"),
        ],
    ),
    Case(
        "pacing: one every period / limit, with one spacing of slack to catch up",
        Limits(rpm=60, pacing=True),
        [
            # Spacing 1 s: after a pause a second admission may follow at once.
            Reserve(0.0, "a"),
            Reserve(0.0, "b"),
            Reserve(0.5, wait_s=0.5, dimension="rpm"),
            Reserve(1.0, "c"),
            Reserve(1.25, wait_s=0.75, dimension="rpm"),
            Reserve(5.0, "d"),
            Reserve(5.0, "e"),
            Reserve(5.0, wait_s=1.0, dimension="rpm"),
        ],
    ),
    Case(
        "concurrency: a full set of slots waits for a release, not for time",
        Limits(concurrency=2),
        [
            Reserve(0.0, "a"),
            Reserve(0.0, "b"),
            Reserve(0.0, wait_s=INF, dimension="concurrency"),
            Used(0.0, "concurrency", 2, in_flight=2),
            Settle(100.0, "a"),
            Reserve(100.0, "c"),
            Refund(101.0, "b"),
            Used(101.0, "concurrency", 1, in_flight=1),
        ],
    ),
    Case(
        "all or nothing: a refusal on one dimension takes nothing from the others",
        Limits(concurrency=5, rpm=10, tpm=100, token_counting=TokenCounting.RESERVE),
        [
            Reserve(0.0, "a", tokens=90),
            Reserve(1.0, tokens=20, wait_s=60.0, dimension="tpm"),
            Used(1.0, "rpm", 1),
            Used(1.0, "concurrency", 1, in_flight=1),
            Reserve(1.0, "b", tokens=10),
            Used(1.0, "tpm", 100),
        ],
    ),
    Case(
        "reserve mode: prompt + max output counts from admission, whatever the usage",
        _tokens(TokenCounting.RESERVE),
        [
            Reserve(0.0, "a", tokens=600),
            Sent(0.0, "a"),
            Settle(10.0, "a", tokens=200),
            Used(10.0, "tpm", 600),
            Reserve(11.0, tokens=500, wait_s=50.0, dimension="tpm"),
            Reserve(61.0, "b", tokens=1000),
        ],
    ),
    Case(
        "usage mode: held while in flight, then the real usage at settle time",
        _tokens(TokenCounting.USAGE),
        [
            Reserve(0.0, "a", tokens=600),
            Used(0.0, "tpm", 600, in_flight=600),
            # Only the settle of `a` can make room: held amounts never expire.
            Reserve(1.0, tokens=500, wait_s=INF, dimension="tpm"),
            Used(90.0, "tpm", 600, in_flight=600),
            Settle(90.0, "a", tokens=300),
            Used(90.0, "tpm", 300),
            Reserve(91.0, "b", tokens=500),
            # 300 (slice 90) + 500 held + 300 > 1000: slice 90 frees at 151 s.
            Reserve(92.0, tokens=300, wait_s=59.0, dimension="tpm"),
            Refund(93.0, "b"),
            Reserve(93.0, "c", tokens=700),
        ],
    ),
    Case(
        "usage mode: usage above the estimate counts in full from settle",
        _tokens(TokenCounting.USAGE),
        [
            Reserve(0.0, "a", tokens=100),
            Settle(5.0, "a", tokens=1200),
            Used(5.0, "tpm", 1200),
            Reserve(6.0, tokens=1, wait_s=60.0, dimension="tpm"),
            Reserve(66.0, "b", tokens=1000),
        ],
    ),
    Case(
        "safe mode: max(reserved, real) until the admission's slice ends, then real",
        _tokens(TokenCounting.SAFE),
        [
            Reserve(0.0, "a", tokens=600),
            Sent(0.0, "a"),
            Settle(10.0, "a", tokens=200),
            # 400 stays in slice 0 (until 61 s), 200 lands in slice 10 (until 71 s).
            Used(10.0, "tpm", 600),
            Reserve(11.0, tokens=500, wait_s=50.0, dimension="tpm"),
            Used(61.0, "tpm", 200),
            Reserve(61.0, "b", tokens=800),
        ],
    ),
    Case(
        "safe mode: a call longer than the period is held throughout",
        _tokens(TokenCounting.SAFE),
        [
            Reserve(0.0, "a", tokens=600),
            Used(89.0, "tpm", 600, in_flight=600),
            Settle(90.0, "a", tokens=700),
            Used(90.0, "tpm", 700),
            Reserve(91.0, tokens=400, wait_s=60.0, dimension="tpm"),
        ],
    ),
    Case(
        "money: a spend rate holds the estimate and records the real cost",
        Limits(rates=(Rate(1.0, 3600, "money", name="usd/h"),)),
        [
            Reserve(0.0, "a", cost=0.75),
            Reserve(1.0, cost=0.5, wait_s=INF, dimension="usd/h"),
            Settle(2.0, "a", cost=0.25),
            Used(2.0, "usd/h", 0.25),
            Reserve(3.0, "b", cost=0.75),
            # Slices are 60 s here: slice 0 ends at 60 s and counts until 3660 s.
            Reserve(4.0, cost=0.125, wait_s=3656.0, dimension="usd/h"),
        ],
    ),
    Case(
        "several rates of one unit: the longest wait names the binding one",
        Limits(rpm=100, rates=(Rate(2, 1.0, "requests", name="rps", slices=4),)),
        [
            Reserve(0.0, "a"),
            Reserve(0.0, "b"),
            Reserve(0.1, wait_s=1.15, dimension="rps"),
            Reserve(1.25, "c"),
        ],
    ),
    Case(
        "tpd on the calendar day resets at local midnight",
        Limits(tpd=1000, tpd_calendar_tz="Asia/Shanghai", token_counting=TokenCounting.RESERVE),
        [
            Reserve(0.0, "a", tokens=1000),
            # BASE_S is 20:00 in Shanghai: the day ends 4 h later.
            Reserve(60.0, tokens=1, wait_s=4 * 3600 - 60.0, dimension="tpd"),
            Used(4 * 3600 - 1.0, "tpd", 1000),
            Reserve(4 * 3600.0, "b", tokens=1000),
        ],
    ),
    Case(
        "cooldown: a pause refuses everything until it ends, the longer pause stands",
        Limits(rpm=100),
        [
            Reserve(0.0, "a"),
            Pause(1.0, 30.0, lasts_s=30.0),
            Reserve(2.0, wait_s=29.0, dimension="cooldown"),
            Pause(3.0, 5.0, lasts_s=28.0),
            Reserve(30.999, wait_s=0.001, dimension="cooldown"),
            Reserve(31.0, "b"),
        ],
    ),
    Case(
        "out: a spent quota's pause names the dimension out while the pause lasts",
        Limits(rpm=100),
        [
            Pause(0.0, 300.0, lasts_s=300.0, out=True),
            Reserve(1.0, wait_s=299.0, dimension="out"),
            # A 429's shorter cooldown leaves the account out.
            Pause(2.0, 5.0, lasts_s=298.0),
            Reserve(3.0, wait_s=297.0, dimension="out"),
            # A longer cooldown lengthens the pause; the account is still out.
            Pause(4.0, 400.0, lasts_s=400.0),
            Reserve(5.0, wait_s=399.0, dimension="out"),
            Reserve(404.0, "a"),
            # Once that pause has ended, a cooldown is a cooldown again.
            Pause(405.0, 5.0, lasts_s=5.0),
            Reserve(406.0, wait_s=4.0, dimension="cooldown"),
        ],
    ),
    Case(
        "out: taken out during a longer cooldown (a spent quota's 429 with a retry-after)",
        Limits(rpm=100),
        [
            Pause(0.0, 120.0, lasts_s=120.0),
            Pause(1.0, 60.0, lasts_s=119.0, out=True),
            Reserve(2.0, wait_s=118.0, dimension="out"),
            Reserve(120.0, "a"),
        ],
    ),
    Case(
        "rpm: a call never said to leave counts from its end",
        Limits(rpm=1),
        [
            Reserve(0.0, "a"),
            # Ended in slice 5: its request had arrived by then, counted until 66 s.
            Settle(5.5, "a"),
            Used(5.5, "rpm", 1),
            Reserve(61.0, wait_s=5.0, dimension="rpm"),
            Reserve(66.0, "b"),
        ],
    ),
    Case(
        "rpm: a call said to leave counts from then, and its end moves nothing",
        Limits(rpm=1),
        [
            Reserve(0.0, "a"),
            Sent(2.5, "a"),
            Settle(5.5, "a"),
            # Counted from slice 2: until 63 s.
            Reserve(61.0, wait_s=2.0, dimension="rpm"),
            Reserve(63.0, "b"),
        ],
    ),
    Case(
        "rpm: a call that ends in its admission's slice counts from there",
        Limits(rpm=1),
        [
            Reserve(0.25, "a"),
            Settle(0.75, "a"),
            Reserve(60.5, wait_s=0.5, dimension="rpm"),
            Reserve(61.0, "b"),
        ],
    ),
    Case(
        "rpm: a refund of a call never said to leave gives its slice back at once",
        Limits(rpm=1),
        [
            Reserve(0.0, "a"),
            Refund(5.5, "a"),
            Used(5.5, "rpm", 0),
            Reserve(5.5, "b"),
        ],
    ),
    Case(
        "reserve mode: a call never said to leave counts its reservation from its end",
        _tokens(TokenCounting.RESERVE),
        [
            Reserve(0.0, "a", tokens=600),
            Settle(10.0, "a", tokens=200),
            Used(10.0, "tpm", 600),
            # Moved to slice 10: until 71 s.
            Reserve(61.0, tokens=500, wait_s=10.0, dimension="tpm"),
            Reserve(71.0, "b", tokens=1000),
        ],
    ),
    Case(
        "safe mode: a call never said to leave counts its remainder from its end",
        _tokens(TokenCounting.SAFE),
        [
            Reserve(0.0, "a", tokens=600),
            Settle(10.0, "a", tokens=200),
            # The remainder (400) and the usage (200) both count in slice 10.
            Used(10.0, "tpm", 600),
            Reserve(61.0, tokens=500, wait_s=10.0, dimension="tpm"),
            Reserve(71.0, "b", tokens=1000),
        ],
    ),
    Case(
        "usage mode: a call never said to leave counts as it does when sent",
        _tokens(TokenCounting.USAGE),
        [
            Reserve(0.0, "a", tokens=600),
            Settle(10.0, "a", tokens=200),
            Used(10.0, "tpm", 200),
            Reserve(11.0, "b", tokens=800),
            Reserve(12.0, tokens=1, wait_s=59.0, dimension="tpm"),
        ],
    ),
]
