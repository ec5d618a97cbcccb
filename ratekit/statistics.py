"""Snapshots for dashboards and tests: `Scheduler.statistics()` gives a
`SchedulerStatistics` (per priority a `PriorityStatistics`, the estimates'
`EstimateStatistics`), `Limiter.statistics()` a `LimiterStatistics` (per dimension a
`DimensionStatistics`), `TokenCounts.statistics()` a `TokenCountStatistics`."""

from ._calibration import EstimateStatistics
from ._limiter import LimiterStatistics
from ._scheduler import PriorityStatistics, SchedulerStatistics
from .backends._base import DimensionStatistics
from .integrations._counts import TokenCountStatistics

__all__ = [
    "DimensionStatistics",
    "EstimateStatistics",
    "LimiterStatistics",
    "PriorityStatistics",
    "SchedulerStatistics",
    "TokenCountStatistics",
]
