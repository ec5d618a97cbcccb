"""Rates and limits: what an account may do, independent of how it is enforced."""

from __future__ import annotations

import dataclasses
import enum
import math
import zoneinfo
from dataclasses import dataclass, field
from typing import Literal

from ._errors import InvalidCostError, LimitsError

Unit = Literal["requests", "tokens", "money"]
UNITS: tuple[Unit, ...] = ("requests", "tokens", "money")

MINUTE_S = 60.0
DAY_S = 86_400.0
DEFAULT_SLICES = 60


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


def check_amount(where: str, value: object, *, allow_zero: bool = True) -> float:
    """Return `value` as a float, or raise `InvalidCostError` naming `where`.

    Accepts ints and floats (not bools); rejects NaN, infinities and negatives,
    and zero too when `allow_zero` is false.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidCostError(f"{where} must be a number, got {value!r}")
    amount = float(value)
    if math.isnan(amount) or math.isinf(amount):
        raise InvalidCostError(f"{where} must be finite, got {value!r}")
    if amount < 0 or (amount == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise InvalidCostError(f"{where} must be {bound}, got {value!r}")
    return amount


@dataclass(frozen=True, slots=True)
class Rate:
    """At most `limit` of `unit` in any window of `period_s` seconds.

    `limit` is an amount of `unit` (requests, tokens, or money in the profile's
    currency). `period_s` may be any positive length, so tests and simulations can
    compress a minute to a second. The window is kept as `slices` slices of
    ``period_s / slices`` each; an admission counts until its slice's end plus
    `period_s` (never early). With `calendar_tz` set (an IANA zone name, only for
    ``period_s == 86400``) the window is instead the calendar day in that zone, which
    resets at local midnight. `name` labels the dimension in statistics and errors.
    """

    limit: float
    period_s: float
    unit: Unit = "requests"
    name: str = ""
    slices: int = DEFAULT_SLICES
    calendar_tz: str | None = None

    def __post_init__(self) -> None:
        label = self.name or "Rate"
        try:
            check_amount(f"{label}.limit", self.limit, allow_zero=False)
            period = check_amount(f"{label}.period_s", self.period_s, allow_zero=False)
        except InvalidCostError as exc:
            raise LimitsError(str(exc)) from None
        if self.unit not in UNITS:
            raise LimitsError(f"{label}.unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if isinstance(self.slices, bool) or not isinstance(self.slices, int) or self.slices < 1:
            raise LimitsError(f"{label}.slices must be a positive int, got {self.slices!r}")
        if self.calendar_tz is not None:
            if period != DAY_S:
                raise LimitsError(
                    f"{label}.calendar_tz needs period_s == 86400, got {self.period_s!r}"
                )
            try:
                zoneinfo.ZoneInfo(self.calendar_tz)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise LimitsError(
                    f"{label}.calendar_tz: unknown time zone {self.calendar_tz!r}"
                ) from None
        if not self.name:
            object.__setattr__(self, "name", f"{self.unit}/{period:g}s")

    @property
    def key(self) -> tuple[str, float, str | None]:
        """What identifies this rate's window across a change of limits: unit, period, calendar."""
        return (self.unit, self.period_s, self.calendar_tz)


def _check_optional_limit(name: str, value: object) -> None:
    if value is None:
        return
    try:
        check_amount(name, value, allow_zero=False)
    except InvalidCostError as exc:
        raise LimitsError(f"{exc} (None means unlimited)") from None


@dataclass(frozen=True, slots=True)
class Limits:
    """Everything an account may do at once: a concurrency cap and a set of rates.

    `rpm`, `tpm` and `tpd` are shorthands for rates of requests per 60 s and tokens
    per 60 s and per 86,400 s; `rates` adds any other (money per day, requests per
    second). `None` means unlimited. `period_scale` multiplies every period (0.02
    turns a minute into 1.2 s) for tests and simulations.

    `margin_s` extends how long every admission counts, for network jitter between
    this client and the provider's clock. `pacing` spreads admissions evenly, one
    every ``period / limit``, for providers with hidden per-second limits.
    `token_counting` says how the provider counts tokens (see `TokenCounting`).
    `tpd_calendar_tz` makes TPD the calendar day in that zone instead of a rolling
    24 hours (it has no effect without `tpd`, and compressed limits roll instead:
    a compressed day has no midnight).

    Limits are immutable values: derive new ones with `replace`.
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
        if self.concurrency is not None and (
            isinstance(self.concurrency, bool)
            or not isinstance(self.concurrency, int)
            or self.concurrency < 1
        ):
            raise LimitsError(
                f"Limits.concurrency must be a positive int or None, got {self.concurrency!r}"
            )
        for name in ("rpm", "tpm", "tpd"):
            _check_optional_limit(f"Limits.{name}", getattr(self, name))
        try:
            check_amount("Limits.margin_s", self.margin_s)
            check_amount("Limits.period_scale", self.period_scale, allow_zero=False)
        except InvalidCostError as exc:
            raise LimitsError(str(exc)) from None
        try:
            object.__setattr__(self, "token_counting", TokenCounting(self.token_counting))
        except ValueError:
            choices = ", ".join(m.value for m in TokenCounting)
            raise LimitsError(
                f"Limits.token_counting must be one of {choices}, got {self.token_counting!r}"
            ) from None
        if not isinstance(self.pacing, bool):
            raise LimitsError(f"Limits.pacing must be True or False, got {self.pacing!r}")
        rates = tuple(self.rates)
        for index, rate in enumerate(rates):
            if not isinstance(rate, Rate):
                raise LimitsError(f"Limits.rates[{index}] must be a Rate, got {rate!r}")
        object.__setattr__(self, "rates", rates)
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
        expanded = [
            Rate(limit, period * scale, unit, name=name, calendar_tz=tz if scale == 1.0 else None)
            for name, limit, period, unit, tz in shorthand
            if limit is not None
        ]
        for rate in self.rates:
            if scale != 1.0:
                rate = dataclasses.replace(rate, period_s=rate.period_s * scale, calendar_tz=None)
            expanded.append(rate)
        return tuple(expanded)

    @property
    def all_rates(self) -> tuple[Rate, ...]:
        """Every rate these limits enforce: the shorthands first, then `rates`, periods scaled."""
        return self._all_rates

    def replace(self, **changes: object) -> Limits:
        """A copy with some fields changed, validated like a new one."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    def scaled(self, factor: float) -> Limits:
        """The same limits with every amount and the concurrency cap times `factor`.

        For running below the published numbers (a provider that tightened its
        limits); the concurrency cap stays at least 1.
        """
        check_amount("Limits.scaled factor", factor, allow_zero=False)
        if factor == 1:
            return self

        def times(value: float | None) -> float | None:
            return None if value is None else value * factor

        concurrency = self.concurrency
        return self.replace(
            concurrency=None if concurrency is None else max(1, int(concurrency * factor)),
            rpm=times(self.rpm),
            tpm=times(self.tpm),
            tpd=times(self.tpd),
            rates=tuple(dataclasses.replace(r, limit=r.limit * factor) for r in self.rates),
        )

    def compressed(self, speed: float) -> Limits:
        """The same limits with time running `speed` times faster (every period divided)."""
        return self.replace(period_scale=self.period_scale / speed)
