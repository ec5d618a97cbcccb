"""Where a limiter's time comes from: `SystemClock` by default, `FakeClock` in tests
(also in `ratekit.testing`), or any `Clock`. An `Instant` is one reading: monotonic
seconds for windows and the wall clock for calendar days."""

from ._clock import Clock, FakeClock, Instant, SystemClock

__all__ = ["Clock", "FakeClock", "Instant", "SystemClock"]
