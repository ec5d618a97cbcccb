"""Who waits for a limiter, and who goes next: pure bookkeeping, no I/O, no clock."""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from typing import Any

import anyio

from ._errors import LimitsError, QueueFullError


class Waiter:
    """One caller waiting for a limiter. `turn` is set when it becomes the head, or when
    the head was admitted together with it (then `grant` holds its admission)."""

    __slots__ = ("asked", "demand", "gone", "grant", "priority", "ticket", "turn")

    def __init__(self, priority: int, demand: Any = None, ticket: float = math.inf) -> None:
        self.priority = priority
        self.demand = demand
        # Its place in the order of arrival: FIFO within a priority follows it.
        self.ticket = ticket
        self.turn = anyio.Event()
        # Removed while not at the front of its level: skipped when it gets there.
        self.gone = False
        # Admitted with the head, not yet taken by its caller.
        self.grant: Any = None
        # In a batch on its way to the backend (as its head or a follower): no other head
        # asks for it meanwhile, so that one caller is never granted twice.
        self.asked = False


def _ticket(waiter: Waiter) -> float:
    return waiter.ticket


class WaitQueue:
    """Callers waiting, served one at a time: the head.

    FIFO within a priority and higher priorities first, except that each lower
    priority with callers waiting earns `lower_share` of a turn per admission and
    is served when it has earned a whole one: while they wait, lower priorities
    get at least that share of admissions, so batch work never starves behind
    interactive work. `max_size` bounds the callers waiting (None: no bound).

    Removing a caller is O(1) whatever its place (a cancelled waiter is marked and
    skipped when it reaches the front), so a storm of cancellations stays linear.
    """

    __slots__ = ("_counts", "_credits", "_levels", "lower_share", "max_size", "size")

    def __init__(self, *, lower_share: float = 0.1, max_size: int | None = None) -> None:
        if (
            isinstance(lower_share, bool)
            or not isinstance(lower_share, int | float)
            or not 0 <= lower_share < 1
        ):
            raise LimitsError(f"lower_share must be a number in [0, 1), got {lower_share!r}")
        if max_size is not None and (
            isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0
        ):
            raise LimitsError(f"max_queue must be a non-negative int or None, got {max_size!r}")
        self.lower_share = lower_share
        self.max_size = max_size
        # Waiters by priority, each level first come first served; the front of a
        # level is always a live waiter, removed ones further back are skipped later.
        self._levels: dict[int, deque[Waiter]] = {}
        # Live waiters per priority.
        self._counts: dict[int, int] = {}
        # Turns earned by each lower priority while it waited.
        self._credits: dict[int, float] = {}
        # How many callers wait (`len`, read without a method call on hot paths); only
        # `push` and `remove` change it.
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def waiting(self) -> dict[int, int]:
        """How many callers wait, per priority."""
        return dict(self._counts)

    def push(self, priority: int, demand: Any = None, *, ticket: float = math.inf) -> Waiter:
        """Queue a caller behind those of its priority with a smaller `ticket` (its place
        in the order of arrival; default: last); `QueueFullError` when `max_size`
        callers already wait. O(1) when callers are pushed in order; else a binary
        search and one insertion (both in C)."""
        if self.max_size is not None and self.size >= self.max_size:
            raise QueueFullError(self.max_size)
        waiter = Waiter(priority, demand, ticket)
        level = self._levels.setdefault(priority, deque())
        if not level or level[-1].ticket <= ticket:
            level.append(waiter)
        else:
            level.insert(bisect.bisect_right(level, ticket, key=_ticket), waiter)
        self._counts[priority] = self._counts.get(priority, 0) + 1
        self.size += 1
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """Take a caller out (admitted, timed out or cancelled), in O(1)."""
        if waiter.gone:
            return
        waiter.gone = True
        priority = waiter.priority
        self.size -= 1
        left = self._counts[priority] - 1
        if not left:
            del self._counts[priority]
            del self._levels[priority]
            self._credits.pop(priority, None)
            return
        self._counts[priority] = left
        level = self._levels[priority]
        while level[0].gone:
            level.popleft()

    def head(self) -> Waiter | None:
        """The caller to serve next, or None when nobody waits."""
        if not self._levels:
            return None
        priorities = sorted(self._levels, reverse=True)
        for priority in priorities[1:]:
            # The admission about to happen earns its share too.
            if self._credits.get(priority, 0.0) + self.lower_share >= 1.0 - 1e-9:
                return self._levels[priority][0]
        return self._levels[priorities[0]][0]

    def behind(self, head: Waiter, count: int) -> list[Waiter]:
        """Up to `count` callers after `head` in its own priority, in order, neither
        admitted nor asked for by another head: those that may be admitted together
        with it."""
        found: list[Waiter] = []
        level = self._levels.get(head.priority)
        if not level or level[0] is not head:
            return found
        for waiter in itertools.islice(level, 1, None):
            if len(found) >= count:
                break
            if not waiter.gone and waiter.grant is None and not waiter.asked:
                found.append(waiter)
        return found

    def admitted(self, waiter: Waiter) -> None:
        """Account for `waiter`'s admission (before `remove`): lower priorities earn credit."""
        top = max(self._levels)
        if waiter.priority != top:
            self._credits[waiter.priority] = self._credits.get(waiter.priority, 0.0) - 1.0
        for priority in self._levels:
            if priority < top:
                self._credits[priority] = self._credits.get(priority, 0.0) + self.lower_share
