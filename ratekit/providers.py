"""What a provider's own pages say: profiles, tiers, models, prices and APIs.

`load_profile` reads a bundled provider (`bundled_providers`) or a profile file; a
`Profile` holds its `Tier`s (each tier's `LimitNumbers`), its `Model`s with their
`Prices`, the `ProviderApi`s it serves, and, for a relay platform, its
`RelayBilling` (`CacheMultiples`, `CharacterRules`, `count_billable_characters`).
"""

from ._pricing import (
    CacheMultiples,
    CharacterRules,
    Prices,
    RelayBilling,
    count_billable_characters,
)
from ._profiles import (
    LimitNumbers,
    Model,
    Profile,
    ProviderApi,
    Tier,
    bundled_providers,
    load_profile,
)

__all__ = [
    "CacheMultiples",
    "CharacterRules",
    "LimitNumbers",
    "Model",
    "Prices",
    "Profile",
    "ProviderApi",
    "RelayBilling",
    "Tier",
    "bundled_providers",
    "count_billable_characters",
    "load_profile",
]
