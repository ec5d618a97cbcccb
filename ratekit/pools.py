"""Pools of accounts: several keys, relay channels or providers behind one admission.

`ratekit.Pool` is at the top level; here are its parts: `Member` (one account),
`Served` (a call admitted on one account), the statistics records, and the order
of preference names (`PREFERENCES`).
"""

from ._errors import PoolExhaustedError
from ._pool import PREFERENCES, AccountStatistics, Member, Pool, PoolSlot, PoolStatistics, Served

__all__ = [
    "PREFERENCES",
    "AccountStatistics",
    "Member",
    "Pool",
    "PoolExhaustedError",
    "PoolSlot",
    "PoolStatistics",
    "Served",
]
