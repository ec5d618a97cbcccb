"""An admission whose request was never said to leave counts from its end.

The provider counts a request from its arrival. A wrapped client says when the
request leaves (`Admission.sent`); a plain ``async with limiter.acquire():`` around
any client does not, and its request may leave well after the admission (a busy
event loop, a cold connection). What such an admission recorded therefore counts
from its end, when the request had arrived at the latest. These tests run through
the limiter on each path an admission can take: the memory backend's uncontended
path, its general path, a tenant's own windows and a real redis-server.
"""

from __future__ import annotations

import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from ratekit import Limiter, Limits, MemoryBackend, Rate, RedisBackend, Tenant, Tenants
from ratekit.clock import FakeClock

pytestmark = pytest.mark.anyio

# A whole number of seconds: slice 0 of a one-minute window starts here.
BASE_S = 1_795_608_000.0
ONE_PER_MINUTE = Limits(rpm=1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio only


Make = Callable[[Limits], Limiter]


@pytest.fixture(
    params=["memory", "memory-general", "tenant", pytest.param("redis", marks=pytest.mark.redis)]
)
async def make(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Make, FakeClock, str]]:
    """Limiters of one path on a fake clock; "memory-general" admits with a timeout (the
    general path), "tenant" for a tenant with limits of its own (the account's are
    unlimited)."""
    clock = FakeClock(BASE_S)
    made: list[RedisBackend] = []
    kind = request.param

    def factory(limits: Limits) -> Limiter:
        if kind == "redis":
            url = request.getfixturevalue("redis_server").url
            backend = RedisBackend(url, namespace=f"end-{uuid.uuid4().hex}", server_time=False)
            made.append(backend)
            return Limiter(limits, backend=backend, clock=clock)
        if kind == "tenant":
            tenants = Tenants(default=Tenant(limits))
            return Limiter(Limits(), backend=MemoryBackend(), clock=clock, tenants=tenants)
        return Limiter(limits, backend=MemoryBackend(), clock=clock)

    yield factory, clock, kind
    for backend in made:
        await backend.aclose()


def _options(kind: str) -> dict[str, Any]:
    if kind == "memory-general":
        return {"timeout": 1000.0}
    if kind == "tenant":
        return {"tenant": "t"}
    return {}


async def _admits(limiter: Limiter, kind: str) -> bool:
    """Whether one more request is admitted now (handed back at once if it is)."""
    options = _options(kind)
    options.pop("timeout", None)
    admission = await limiter.try_acquire(**options)
    if admission is None:
        return False
    await admission.refund()
    return True


async def _frees_at(limiter: Limiter, clock: FakeClock, kind: str, at_s: float) -> None:
    """The window admits one more request from `at_s` after BASE_S on, not 0.1 s before."""
    clock.set(BASE_S + at_s - 0.1)
    assert not await _admits(limiter, kind)
    clock.set(BASE_S + at_s)
    assert await _admits(limiter, kind)


async def test_a_call_never_said_to_leave_counts_from_its_end(
    make: tuple[Make, FakeClock, str],
) -> None:
    factory, clock, kind = make
    limiter = factory(ONE_PER_MINUTE)
    async with limiter.acquire(**_options(kind)):
        clock.advance(5.5)  # the call lasts into slice 5
    # Counted from its admission it would have gone at 61 s; from its end, at 66 s.
    await _frees_at(limiter, clock, kind, 66.0)


async def test_a_call_said_to_leave_counts_from_then_and_its_end_moves_nothing(
    make: tuple[Make, FakeClock, str],
) -> None:
    factory, clock, kind = make
    limiter = factory(ONE_PER_MINUTE)
    async with limiter.acquire(**_options(kind)) as admission:
        clock.advance(2.5)
        await admission.sent()
        clock.advance(3.0)
    await _frees_at(limiter, clock, kind, 63.0)


async def test_a_call_ended_in_its_admissions_slice_counts_from_there(
    make: tuple[Make, FakeClock, str],
) -> None:
    factory, clock, kind = make
    limiter = factory(ONE_PER_MINUTE)
    clock.set(BASE_S + 0.25)
    async with limiter.acquire(**_options(kind)):
        clock.set(BASE_S + 0.75)
    await _frees_at(limiter, clock, kind, 61.0)


async def test_a_refund_of_a_call_never_said_to_leave_gives_it_all_back(
    make: tuple[Make, FakeClock, str],
) -> None:
    factory, clock, kind = make
    limiter = factory(ONE_PER_MINUTE)
    admission = await limiter.acquire(**_options(kind))
    clock.advance(5.5)
    await admission.refund()
    assert await _admits(limiter, kind)


async def test_a_reservation_never_said_to_leave_counts_from_its_end_with_its_usage(
    make: tuple[Make, FakeClock, str],
) -> None:
    """Tokens counted the "safe" way (the bundled profiles' default): the estimate's
    remainder and the usage both count from the end."""
    factory, clock, kind = make
    limiter = factory(Limits(tpm=1000, rates=(Rate(1000, 60, "requests"),)))
    async with limiter.acquire(tokens=600, **_options(kind)) as admission:
        clock.advance(10.0)
        admission.settle(tokens=200)
    clock.set(BASE_S + 61.0)
    options = _options(kind)
    options.pop("timeout", None)
    assert await limiter.try_acquire(tokens=500, **options) is None
    clock.set(BASE_S + 71.0)
    later = await limiter.try_acquire(tokens=1000, **options)
    assert later is not None
    await later.refund()


async def test_a_dropped_admission_counts_from_when_it_is_handed_back() -> None:
    clock = FakeClock(BASE_S)
    limiter = Limiter(ONE_PER_MINUTE, backend=MemoryBackend(), clock=clock)
    admission = await limiter.acquire()
    clock.advance(5.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del admission
    # Handed back at the loop's next turn, at 5.5 s.
    import anyio.lowlevel

    await anyio.lowlevel.checkpoint()
    clock.set(BASE_S + 65.9)
    assert await limiter.try_acquire() is None
    clock.set(BASE_S + 66.0)
    assert await limiter.try_acquire() is not None
