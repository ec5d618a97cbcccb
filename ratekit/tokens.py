"""How many tokens a call will use, before it is sent.

The scheduler reserves `tokens_to_reserve` of a request (its prompt's estimate plus
its output cap) and settles the real usage afterwards. `default_estimator` is
tiktoken's when the ``tokenizer`` extra is installed and loads, else
`HeuristicEstimator` with the profile's hints; any `TokenEstimator` can replace it.
`TokenCounts` asks the provider to count a prompt exactly where it can (Anthropic's
``count_tokens``).
"""

from ._estimate import TokenEstimate
from ._tokens import (
    HeuristicEstimator,
    TiktokenEstimator,
    TokenEstimator,
    default_estimator,
    estimate_prompt_tokens,
    estimate_request_tokens,
    tokens_to_reserve,
)
from .integrations._counts import TokenCounts

__all__ = [
    "HeuristicEstimator",
    "TiktokenEstimator",
    "TokenCounts",
    "TokenEstimate",
    "TokenEstimator",
    "default_estimator",
    "estimate_prompt_tokens",
    "estimate_request_tokens",
    "tokens_to_reserve",
]
