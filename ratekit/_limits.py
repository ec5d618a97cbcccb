"""Rates and limits: what an account may do, independent of how it is enforced.

Every number is checked where it is given, against bounds that keep the window
math exact in Python and in the Redis Lua scripts (both use doubles):

- limits and amounts (`Rate.limit`, `rpm`, `tpm`, `tpd`, a top-up, the amounts of
  `check_amount`) at most `MAX_AMOUNT` (1e15): sums of a few limit-sized amounts
  stay exact integers in a double (below 2**53, about 9e15), and no sum overflows.
  The largest bundled number is a TPM of 1e8. A limit is at least `MIN_LIMIT`
  (1e-6 of a request, token or currency unit): less admits nothing usable.
- periods (after `period_scale`) in [`MIN_PERIOD_S`, `MAX_PERIOD_S`] = [1 ms, 400
  days]: below a millisecond no event loop timer can pace, and 400 days holds a
  yearly budget.
- `Rate.slices` in [1, `MAX_SLICES`] (100,000), and a slice at least `MIN_SLICE_S`
  (10 µs) wide, so a slice index (a clock reading / the slice width) is an exact
  integer in a double for any clock reading below 9e10 s.
- `Limits.concurrency` in [1, `MAX_CONCURRENCY`] (1,000,000 calls in flight).
- `Limits.margin_s` in [0, `MAX_MARGIN_S`] (an hour of clock jitter).
- `Limits.period_scale`, and the speed of `compressed`, in [`MIN_SCALE`,
  `MAX_SCALE`] = [1e-6, 1e6]; `scaled` takes a factor in (0, 1e6].

A wrong type raises `LimitsTypeError` (an `InvalidArgumentError` and a
`LimitsError`); a number out of range raises `LimitsError`. Both name the field and
the value. The checks run at construction only, never per admission.
"""

from __future__ import annotations

import dataclasses
import decimal
import enum
import math
import reprlib
import zoneinfo
from dataclasses import dataclass, field
from typing import Final, Literal, SupportsFloat, SupportsIndex, TypeAlias

from ._errors import InvalidCostError, LimitsError, LimitsTypeError, RatekitError

Unit = Literal["requests", "tokens", "money"]
UNITS: tuple[Unit, ...] = ("requests", "tokens", "money")

MINUTE_S = 60.0
DAY_S = 86_400.0
DEFAULT_SLICES = 60

MAX_AMOUNT: Final = 1e15
# How the amount and priority arguments of an admission are typed: as anything a number
# is made from, while at run time only ints and floats (no bools) pass `check_amount`,
# and only ints `check_priority`. Typed that widely so that the check is ratekit's in
# the compiled build as in the pure one: mypyc turns an argument typed `float` into a C
# double at the call (a bool into 1.0, an int into a float) and one typed `int` refuses
# anything else with its own TypeError.
Amount: TypeAlias = SupportsFloat
Priority: TypeAlias = SupportsIndex
MIN_LIMIT = 1e-6
MIN_PERIOD_S = 1e-3
MAX_PERIOD_S = 400 * DAY_S
MAX_SLICES = 100_000
MIN_SLICE_S = 1e-5
MAX_CONCURRENCY = 1_000_000
MAX_MARGIN_S = 3_600.0
# The margin of a provider tier's limits unless the account says otherwise, in real
# seconds (never compressed): how much later than the instant an admission counts
# from its request may reach the provider. A request counts from the end of its
# write (`Admission.sent`, which wrapped clients call) or else from the call's end,
# so this covers the provider's side: the network, and how late its own loop stamps
# an arrival. 50 ms: four client processes, Redis and a local provider sharing two
# cores got rpm 429s in every run at 20 ms and none in 8 runs at 50 ms (at a load of
# 4, some even at 100 ms: a provider starved of CPU, which examples/redis_processes.py
# gives a margin of its own); 0.08 % of a 60 s window.
DEFAULT_MARGIN_S = 0.05
MIN_SCALE = 1e-6
MAX_SCALE = 1e6

_UNLIMITED = " (None means unlimited)"
_SHORT = reprlib.Repr()
_SHORT.maxstring = 60
_SHORT.maxother = 60


class TokenCounting(enum.StrEnum):
    """How a provider counts tokens toward its token rates.

    - ``RESERVE``: at arrival, prompt + max output; the reservation is what counts.
    - ``USAGE``: the real usage, when the call completes; the reservation is held
      (never expiring) while the call is in flight.
    - ``SAFE``: never less than either of the above; the default when a provider
      does not say.
    """

    RESERVE = "reserve"
    USAGE = "usage"
    SAFE = "safe"


def show(value: object) -> str:
    """`value` as an error message shows it: its repr, kept short.

    An int too long to read is shown as ``10**308`` when it is a power of ten, else
    by its leading digits and length; long strings and objects are cut.
    """
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        digits = str(abs(value))
        sign = "-" if value < 0 else ""
        if digits.strip("0") == "1":
            return f"{sign}10**{len(digits) - 1}"
        return f"{sign}{decimal.Decimal(digits):.6e} (an int of {len(digits)} digits)"
    if isinstance(value, float | int):
        return repr(value)
    return _SHORT.repr(value)


def _bound(value: float) -> str:
    """A bound as messages write it: 3600, 34560000, 0.001, 1e+15."""
    if float(value).is_integer() and abs(value) < 1e12:
        return str(int(value))
    return f"{value:g}"


def check_amount(
    where: str, value: object, *, allow_zero: bool = True, maximum: float = MAX_AMOUNT
) -> float:
    """Return `value` as a float, or raise `InvalidCostError` naming `where`.

    Accepts ints and floats (not bools); rejects NaN, infinities, negatives, zero too
    when `allow_zero` is false, and anything above `maximum` (`MAX_AMOUNT`, 1e15, by
    default: no real amount is larger, and sums of such amounts stay exact).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidCostError(f"{where} must be a number, got {show(value)}")
    try:
        amount = float(value)
    except OverflowError:  # an int beyond any float: treated as beyond every bound
        amount = math.inf if value > 0 else -math.inf
    else:
        if math.isnan(amount) or math.isinf(amount):
            raise InvalidCostError(f"{where} must be finite, got {show(value)}")
    if amount < 0 or (amount == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise InvalidCostError(f"{where} must be {bound}, got {show(value)}")
    if amount > maximum:
        raise InvalidCostError(f"{where} must be at most {_bound(maximum)}, got {show(value)}")
    return amount


def check_number(
    where: str,
    value: object,
    *,
    positive: bool,
    high: float,
    low: float = 0.0,
    suffix: str = "",
    type_error: type[RatekitError] = LimitsTypeError,
) -> float:
    """Return `value` as a float within [`low`, `high`], or raise naming `where`.

    A bool, str, None or any non-number raises `type_error` (`LimitsTypeError` by
    default); NaN, infinities, a negative (or zero, when `positive`), or a number
    outside the bounds raises `LimitsError`. `suffix` ends every message.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise type_error(f"{where} must be a number, got {show(value)}{suffix}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float: treated as beyond every bound
        number = math.inf if value > 0 else -math.inf
    else:
        if math.isnan(number) or math.isinf(number):
            raise LimitsError(f"{where} must be finite, got {show(value)}{suffix}")
    if number < 0 or (positive and number == 0):
        sign = "positive" if positive else "non-negative"
        raise LimitsError(f"{where} must be {sign}, got {show(value)}{suffix}")
    if number < low:
        raise LimitsError(f"{where} must be at least {_bound(low)}, got {show(value)}{suffix}")
    if number > high:
        raise LimitsError(f"{where} must be at most {_bound(high)}, got {show(value)}{suffix}")
    return number


def check_count(
    where: str,
    value: object,
    *,
    high: int,
    optional: bool = False,
    type_error: type[RatekitError] = LimitsTypeError,
) -> int:
    """Return `value`, an int in [1, `high`], or raise naming `where`.

    A bool, float, str or other non-int raises `type_error`; an int out of range
    raises `LimitsError`. `optional` only says in the messages that None (which the
    caller lets through) is allowed too.
    """
    kind = "a positive int or None" if optional else "a positive int"
    if isinstance(value, bool) or not isinstance(value, int):
        raise type_error(f"{where} must be {kind}, got {show(value)}")
    if value < 1:
        raise LimitsError(f"{where} must be {kind}, got {show(value)}")
    if value > high:
        unlimited = _UNLIMITED if optional else ""
        raise LimitsError(f"{where} must be at most {high}, got {show(value)}{unlimited}")
    return value


def _check_zone(where: str, zone: object) -> None:
    if not isinstance(zone, str):
        raise LimitsTypeError(f"{where} must be an IANA time zone name or None, got {show(zone)}")
    try:
        zoneinfo.ZoneInfo(zone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise LimitsError(f"{where}: unknown time zone {show(zone)}") from None


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `limit` of `unit` in any window of `period_s` seconds.

    `limit` is an amount of `unit` (requests, tokens, or money in the profile's
    currency), in [1e-6, 1e15]. `period_s` may be any length in [0.001 s, 400 days],
    so tests and simulations can compress a minute to a second. The window is kept
    as `slices` slices (an int in [1, 100,000]) of ``period_s / slices`` each, at
    least 10 µs wide; an admission counts until its slice's end plus `period_s`
    (never early). With `calendar_tz` set (an IANA zone name, only for
    ``period_s == 86400``) the window is instead the calendar day in that zone, which
    resets at local midnight. `name` labels the dimension in statistics and errors.
    A bad value raises `LimitsError` (`LimitsTypeError` for a wrong type) naming it.
    """

    limit: float
    period_s: float
    unit: Unit = "requests"
    name: str = ""
    slices: int = DEFAULT_SLICES
    calendar_tz: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise LimitsTypeError(f"Rate.name must be a str, got {show(self.name)}")
        label = self.name or "Rate"
        check_number(f"{label}.limit", self.limit, positive=True, low=MIN_LIMIT, high=MAX_AMOUNT)
        period = check_number(
            f"{label}.period_s",
            self.period_s,
            positive=True,
            low=MIN_PERIOD_S,
            high=MAX_PERIOD_S,
        )
        if self.unit not in UNITS:
            raise LimitsError(
                f"{label}.unit must be one of {', '.join(UNITS)}, got {show(self.unit)}"
            )
        slices = check_count(f"{label}.slices", self.slices, high=MAX_SLICES)
        if period / slices < MIN_SLICE_S:
            raise LimitsError(
                f"{label}.slices {slices} cut a period of {period:g} s into slices of "
                f"{period / slices:g} s; a slice must be at least {_bound(MIN_SLICE_S)} s "
                "(use fewer slices or a longer period)"
            )
        if self.calendar_tz is not None:
            if period != DAY_S:
                raise LimitsError(
                    f"{label}.calendar_tz needs period_s == 86400, got {show(self.period_s)}"
                )
            _check_zone(f"{label}.calendar_tz", self.calendar_tz)
        if not self.name:
            object.__setattr__(self, "name", f"{self.unit}/{period:g}s")

    @property
    def key(self) -> tuple[str, float, str | None]:
        """What identifies this rate's window across a change of limits: unit, period, calendar."""
        return (self.unit, self.period_s, self.calendar_tz)


def _check_optional_limit(where: str, value: object) -> None:
    if value is not None:
        check_number(where, value, positive=True, low=MIN_LIMIT, high=MAX_AMOUNT, suffix=_UNLIMITED)


@dataclass(frozen=True, slots=True)
class Limits:
    """Everything an account may do at once: a concurrency cap and a set of rates.

    `rpm`, `tpm` and `tpd` are shorthands for rates of requests per 60 s and tokens
    per 60 s and per 86,400 s, each in [1e-6, 1e15]; `rates` (a tuple or list of
    `Rate`) adds any other (money per day, requests per second). `None` means
    unlimited. `concurrency` is an int in [1, 1,000,000]. `period_scale` (in [1e-6,
    1e6]) multiplies every period (0.02 turns a minute into 1.2 s) for tests and
    simulations; every scaled period must stay in [0.001 s, 400 days].

    `margin_s` (in [0, 3600]) extends how long every admission counts, for network
    jitter between this client and the provider's clock. `pacing` spreads admissions
    evenly, one every ``period / limit``, for providers with hidden per-second limits.
    `token_counting` says how the provider counts tokens (see `TokenCounting`).
    `tpd_calendar_tz` makes TPD the calendar day in that zone instead of a rolling
    24 hours (it has no effect without `tpd`, and compressed limits roll instead:
    a compressed day has no midnight).

    Every field is checked at construction: `LimitsError` names the field and the
    value (`LimitsTypeError` for a wrong type). Limits are immutable values: derive
    new ones with `replace`, `scaled` or `compressed`.
    """

    concurrency: int | None = None
    rpm: float | None = None
    tpm: float | None = None
    tpd: float | None = None
    rates: tuple[Rate, ...] = ()
    margin_s: float = 0.0
    pacing: bool = False
    token_counting: TokenCounting = TokenCounting.SAFE
    tpd_calendar_tz: str | None = None
    period_scale: float = 1.0
    _all_rates: tuple[Rate, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.concurrency is not None:
            check_count("Limits.concurrency", self.concurrency, high=MAX_CONCURRENCY, optional=True)
        for name in ("rpm", "tpm", "tpd"):
            _check_optional_limit(f"Limits.{name}", getattr(self, name))
        check_number("Limits.margin_s", self.margin_s, positive=False, high=MAX_MARGIN_S)
        check_number(
            "Limits.period_scale",
            self.period_scale,
            positive=True,
            low=MIN_SCALE,
            high=MAX_SCALE,
        )
        try:
            object.__setattr__(self, "token_counting", TokenCounting(self.token_counting))
        except (ValueError, TypeError):
            choices = ", ".join(m.value for m in TokenCounting)
            raise LimitsError(
                f"Limits.token_counting must be one of {choices}, got {show(self.token_counting)}"
            ) from None
        if not isinstance(self.pacing, bool):
            raise LimitsTypeError(f"Limits.pacing must be True or False, got {show(self.pacing)}")
        if self.tpd_calendar_tz is not None:
            _check_zone("Limits.tpd_calendar_tz", self.tpd_calendar_tz)
        object.__setattr__(self, "rates", _check_rates(self.rates))
        object.__setattr__(self, "_all_rates", self._expand_rates())
        names = [rate.name for rate in self._all_rates]
        for name in names:
            if names.count(name) > 1:
                raise LimitsError(f"Limits: two rates are named {name!r}; names must be unique")
        seen: dict[tuple[str, float, str | None], str] = {}
        for rate in self._all_rates:
            if rate.key in seen:
                raise LimitsError(
                    f"Limits: {rate.name} and {seen[rate.key]} are both {rate.unit} "
                    f"per {rate.period_s:g} s; keep one"
                )
            seen[rate.key] = rate.name

    def _expand_rates(self) -> tuple[Rate, ...]:
        scale = self.period_scale
        shorthand: list[tuple[str, float | None, float, Unit, str | None]] = [
            ("rpm", self.rpm, MINUTE_S, "requests", None),
            ("tpm", self.tpm, MINUTE_S, "tokens", None),
            ("tpd", self.tpd, DAY_S, "tokens", self.tpd_calendar_tz),
        ]
        try:
            expanded = [
                Rate(limit, period * scale, unit, name=name, calendar_tz=tz if scale == 1 else None)
                for name, limit, period, unit, tz in shorthand
                if limit is not None
            ]
            for rate in self.rates:
                if scale != 1:
                    rate = dataclasses.replace(
                        rate, period_s=rate.period_s * scale, calendar_tz=None
                    )
                expanded.append(rate)
        except LimitsError as exc:  # only a scaled period can fail here
            raise LimitsError(f"Limits.period_scale {show(scale)}: {exc}") from None
        return tuple(expanded)

    @property
    def all_rates(self) -> tuple[Rate, ...]:
        """Every rate these limits enforce: the shorthands first, then `rates`, periods scaled."""
        return self._all_rates

    def replace(self, **changes: object) -> Limits:
        """A copy with some fields changed, validated like a new one.

        An unknown field raises `LimitsTypeError` naming it and the known ones.
        """
        for name in changes:
            if name not in _FIELDS:
                raise LimitsTypeError(
                    f"Limits.replace: unknown field {name!r}; known: {', '.join(_FIELDS)}"
                )
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def scaled(self, factor: float) -> Limits:
        """The same limits with every amount and the concurrency cap times `factor`.

        For running below the published numbers (a provider that tightened its
        limits). `factor` is a number in (0, 1e6]. Scaling down never fails: the
        concurrency cap stays at least 1 and every limit at least 1e-6. Scaling up
        past 1e15 (or 1,000,000 calls in flight) raises `LimitsError` naming `factor`.
        """
        check_number("Limits.scaled(factor)", factor, positive=True, high=MAX_SCALE)
        if factor == 1:
            return self

        def times(value: float | None) -> float | None:
            return None if value is None else max(value * factor, MIN_LIMIT)

        concurrency = self.concurrency
        try:
            return self.replace(
                concurrency=None if concurrency is None else max(1, int(concurrency * factor)),
                rpm=times(self.rpm),
                tpm=times(self.tpm),
                tpd=times(self.tpd),
                rates=tuple(
                    dataclasses.replace(r, limit=max(r.limit * factor, MIN_LIMIT))
                    for r in self.rates
                ),
            )
        except LimitsError as exc:
            raise LimitsError(f"Limits.scaled({show(factor)}): {exc}") from None

    def compressed(self, speed: float) -> Limits:
        """The same limits with time running `speed` times faster (every period divided).

        `speed` is a number in [1e-6, 1e6]; the periods it makes must stay in
        [0.001 s, 400 days], else `LimitsError` names `speed` and the period.
        """
        check_number(
            "Limits.compressed(speed)", speed, positive=True, low=MIN_SCALE, high=MAX_SCALE
        )
        try:
            return self.replace(period_scale=self.period_scale / speed)
        except LimitsError as exc:
            raise LimitsError(f"Limits.compressed({show(speed)}): {exc}") from None


def _check_rates(rates: object) -> tuple[Rate, ...]:
    if not isinstance(rates, tuple | list):
        raise LimitsTypeError(f"Limits.rates must be a tuple of Rate, got {show(rates)}")
    for index, rate in enumerate(rates):
        if not isinstance(rate, Rate):
            raise LimitsTypeError(f"Limits.rates[{index}] must be a Rate, got {show(rate)}")
    return tuple(rates)


_FIELDS = tuple(f.name for f in dataclasses.fields(Limits) if f.init)
