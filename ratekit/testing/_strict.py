"""Exact rolling-window enforcement, the way a strict provider counts: pure, time as an argument.

`StrictWindows` is the provider side of the window contract: it keeps a log of every
arrival still inside each rate's window (no slices, no slack) and refuses any call
that would put a window over its limit. It is the one implementation behind the
in-process `simulation.StrictProvider` and the HTTP `mock_provider.MockProvider`.

Every method that depends on time takes `now_s` (seconds, any epoch, never going
back), so the math is tested at fixed instants. Not thread-safe; one event loop.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .._errors import InvalidArgumentError
from .._limits import Limits, Rate, TokenCounting

CONCURRENCY = "concurrency"


PROVIDER_COUNTINGS = (TokenCounting.RESERVE, TokenCounting.USAGE)
"""How a provider can count a call's tokens toward its token rates.

- ``RESERVE``: prompt + max output, at arrival, for one period.
- ``USAGE``: the real usage, at completion, for one period; while the call is in
  flight its reservation (prompt + max output) is held so that no window can ever go
  over its limit whatever the call's real usage.

``SAFE`` is a client's policy for a provider that does not say, never a provider's.
"""


def provider_counting(counting: TokenCounting | str) -> TokenCounting:
    """`counting` as a provider's way of counting, or `InvalidArgumentError`."""
    try:
        mode = TokenCounting(counting)
    except ValueError:
        mode = None
    if mode not in PROVIDER_COUNTINGS:
        choices = ", ".join(repr(choice.value) for choice in PROVIDER_COUNTINGS)
        raise InvalidArgumentError(
            f"a provider counts tokens as one of {choices}, not {counting!r}"
        )
    return mode


@dataclass(frozen=True, slots=True)
class StrictRefusal:
    """Why a call was refused and when it could be admitted.

    `dimension` is the first dimension over its limit (a rate's name or
    ``"concurrency"``), `unit` its unit (``"requests"``, ``"tokens"`` or
    ``"concurrency"``). `retry_after_s` is the wait from the refusal until every
    dimension would admit the same call, absent other arrivals: exact for rolling
    windows; for concurrency and in-flight holds, the earliest planned end of a call
    in flight; `inf` when no wait can help (the cost exceeds a whole limit, or the
    call that must end has no planned end). `never` says the cost exceeds a limit.
    """

    dimension: str
    unit: str
    retry_after_s: float
    never: bool = False


@dataclass(frozen=True, slots=True)
class RateState:
    """One rate at one instant: `limit`, `remaining` (may be 0) and `reset_s`.

    `reset_s` is the wait in seconds until the window is empty again (0 when it is),
    not counting holds of calls in flight.
    """

    name: str
    unit: str
    limit: float
    remaining: float
    reset_s: float


@dataclass(frozen=True, slots=True)
class Ticket:
    """An admitted call: its id, the tokens held while in flight, and its planned end (s)."""

    id: int
    held_tokens: float
    until_s: float


class _Log:
    """Every arrival still inside one rate's rolling window."""

    __slots__ = ("arrivals", "peak", "rate", "total")

    def __init__(self, rate: Rate, arrivals: Iterable[tuple[float, float]] = ()) -> None:
        self.rate = rate
        # (arrival time in s, amount) oldest first; an arrival counts while now < time + period.
        self.arrivals: deque[tuple[float, float]] = deque(arrivals)
        # Sum of the amounts in `arrivals`.
        self.total = sum(amount for _, amount in self.arrivals)
        # Largest `total` (plus holds) seen just after an admission.
        self.peak = 0.0

    def expire(self, now_s: float) -> None:
        period = self.rate.period_s
        while self.arrivals and self.arrivals[0][0] + period <= now_s:
            self.total -= self.arrivals.popleft()[1]
        if not self.arrivals:
            self.total = 0.0  # no float drift once the window is empty

    def wait_s(self, now_s: float, amount: float, held: float) -> float:
        """Seconds until `amount` fits beside `held`, as the oldest arrivals expire; inf: never."""
        excess = self.total + held + amount - self.rate.limit
        if excess <= 0:
            return 0.0
        for arrived_s, old in self.arrivals:
            excess -= old
            if excess <= 0:
                return arrived_s + self.rate.period_s - now_s
        return math.inf

    def add(self, now_s: float, amount: float) -> None:
        if amount > 0:
            self.arrivals.append((now_s, amount))
            self.total += amount

    def reset_s(self, now_s: float) -> float:
        if not self.arrivals:
            return 0.0
        return max(self.arrivals[-1][0] + self.rate.period_s - now_s, 0.0)


class StrictWindows:
    """Admits calls within `limits` exactly and refuses any beyond them.

    Requests count at arrival; tokens as `counting` says (see `PROVIDER_COUNTINGS`);
    concurrency counts calls in flight (admitted, not yet finished). Money rates are
    ignored. A refused call counts nothing. Use `try_admit` at arrival and `finish`
    at completion; `set_limits` changes the limits and keeps the traffic already
    counted.
    """

    def __init__(
        self, limits: Limits, counting: TokenCounting | str = TokenCounting.RESERVE
    ) -> None:
        self.counting = provider_counting(counting)
        self.limits = limits
        self._logs: list[_Log] = [_Log(rate) for rate in _enforced(limits)]
        # Calls in flight by ticket id.
        self._in_flight: dict[int, Ticket] = {}
        self._ids = itertools.count(1)
        # Most calls ever in flight at once.
        self.peak_in_flight = 0
        # Refusals by the first dimension over its limit.
        self.rejected: dict[str, int] = {}

    @property
    def in_flight(self) -> int:
        """Calls admitted and not yet finished."""
        return len(self._in_flight)

    @property
    def held_tokens(self) -> float:
        """Tokens held by calls in flight (always 0 when counting ``reserve``)."""
        return sum(ticket.held_tokens for ticket in self._in_flight.values())

    def set_limits(self, limits: Limits, now_s: float) -> None:
        """Enforce `limits` from now on, counting the arrivals already in the windows.

        A rate with the same unit and period as before keeps its log; a new rate is
        seeded from the longest-period log of its unit (history older than that is
        not known).
        """
        old = {log.rate.key: log for log in self._logs}
        logs: list[_Log] = []
        for rate in _enforced(limits):
            kept = old.get(rate.key)
            if kept is not None:
                kept.rate = rate
                logs.append(kept)
            else:
                logs.append(_Log(rate, self._history(rate, now_s)))
        self._logs = logs
        self.limits = limits

    def _history(self, rate: Rate, now_s: float) -> list[tuple[float, float]]:
        same_unit = [log for log in self._logs if log.rate.unit == rate.unit]
        if not same_unit:
            return []
        longest = max(same_unit, key=lambda log: log.rate.period_s)
        return [
            (arrived_s, amount)
            for arrived_s, amount in longest.arrivals
            if arrived_s + rate.period_s > now_s
        ]

    def try_admit(
        self, now_s: float, *, tokens: float, until_s: float = math.inf
    ) -> Ticket | StrictRefusal:
        """Admit one call costing `tokens` (prompt + max output) at `now_s`, or refuse it.

        `until_s` is when the call is planned to end (for concurrency wait hints).
        """
        for log in self._logs:
            log.expire(now_s)
        refusal = self._refusal(now_s, tokens)
        if refusal is not None:
            self.rejected[refusal.dimension] = self.rejected.get(refusal.dimension, 0) + 1
            return refusal
        held = tokens if self.counting is TokenCounting.USAGE else 0.0
        ticket = Ticket(next(self._ids), held, until_s)
        self._in_flight[ticket.id] = ticket
        for log in self._logs:
            log.add(now_s, self._arrival_amount(log.rate, tokens))
        self._note_peaks()
        return ticket

    def _arrival_amount(self, rate: Rate, tokens: float) -> float:
        if rate.unit == "requests":
            return 1.0
        return tokens if self.counting is TokenCounting.RESERVE else 0.0

    def _refusal(self, now_s: float, tokens: float) -> StrictRefusal | None:
        """The refusal of a call costing `tokens` at `now_s`, or None when all admit it."""
        first: tuple[str, str] | None = None
        wait_s, never = 0.0, False
        cap = self.limits.concurrency
        if cap is not None and len(self._in_flight) >= cap:
            first = (CONCURRENCY, CONCURRENCY)
            wait_s = self._earliest_end_s(now_s)
        held = self.held_tokens
        for log in self._logs:
            amount = 1.0 if log.rate.unit == "requests" else tokens
            hold = held if log.rate.unit == "tokens" else 0.0
            if log.total + hold + amount <= log.rate.limit:
                continue
            first = first or (log.rate.name, log.rate.unit)
            if amount > log.rate.limit:
                never = True
            log_wait = log.wait_s(now_s, amount, hold)
            if math.isinf(log_wait) and amount <= log.rate.limit:
                log_wait = self._earliest_end_s(now_s)  # a hint: holds end with their calls
            wait_s = max(wait_s, log_wait)
        if first is None:
            return None
        return StrictRefusal(first[0], first[1], math.inf if never else wait_s, never)

    def _earliest_end_s(self, now_s: float) -> float:
        ends = [ticket.until_s for ticket in self._in_flight.values()]
        return max(min(ends) - now_s, 0.0) if ends else 0.0

    def finish(self, ticket: Ticket, now_s: float, *, used_tokens: float) -> None:
        """End an admitted call at `now_s`; it used `used_tokens` (counted when ``usage``).

        Finishing a ticket twice does nothing the second time.
        """
        if self._in_flight.pop(ticket.id, None) is None:
            return
        if self.counting is TokenCounting.USAGE:
            for log in self._logs:
                log.expire(now_s)
                if log.rate.unit == "tokens":
                    log.add(now_s, used_tokens)
            self._note_peaks()

    def _note_peaks(self) -> None:
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))
        held = self.held_tokens
        for log in self._logs:
            in_window = log.total + (held if log.rate.unit == "tokens" else 0.0)
            log.peak = max(log.peak, in_window)

    def states(self, now_s: float) -> list[RateState]:
        """Each enforced rate's limit, remaining amount and reset wait at `now_s`."""
        held = self.held_tokens
        out = []
        for log in self._logs:
            log.expire(now_s)
            used = log.total + (held if log.rate.unit == "tokens" else 0.0)
            remaining = max(log.rate.limit - used, 0.0)
            out.append(
                RateState(
                    log.rate.name, log.rate.unit, log.rate.limit, remaining, log.reset_s(now_s)
                )
            )
        return out

    def peak_use(self) -> dict[str, tuple[float, float]]:
        """Per dimension: (largest amount seen in any window, limit)."""
        use = {log.rate.name: (log.peak, log.rate.limit) for log in self._logs}
        if self.limits.concurrency is not None:
            use[CONCURRENCY] = (float(self.peak_in_flight), float(self.limits.concurrency))
        return use


def _enforced(limits: Limits) -> list[Rate]:
    return [rate for rate in limits.all_rates if rate.unit != "money"]
