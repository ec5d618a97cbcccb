"""Token-estimation hints from provider pages: pure functions, no I/O.

A hint says how many characters of one script a provider counts as how many tokens
(MiniMax: about 1,600 Chinese characters to 1,000 tokens). Use it to estimate a
prompt's tokens before a call when no tokenizer is at hand; the real usage from the
response replaces the estimate at settle time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from ._errors import LimitsError
from ._pricing import character_class

Script = Literal["chinese"]
SCRIPTS: tuple[Script, ...] = ("chinese",)


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """About `tokens` tokens for every `characters` characters of `script`."""

    script: Script
    characters: int
    tokens: int

    def __post_init__(self) -> None:
        if self.script not in SCRIPTS:
            raise LimitsError(
                f"TokenEstimate.script must be one of {', '.join(SCRIPTS)}, got {self.script!r}"
            )
        for name in ("characters", "tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LimitsError(f"TokenEstimate.{name} must be a positive int, got {value!r}")

    def tokens_for(self, characters: int) -> int:
        """Estimated tokens for `characters` characters of the script, rounded up."""
        if isinstance(characters, bool) or not isinstance(characters, int) or characters < 0:
            raise LimitsError(f"characters must be a non-negative int, got {characters!r}")
        return math.ceil(characters * self.tokens / self.characters)

    def tokens_in(self, text: str) -> int:
        """Estimated tokens for the characters of the script in `text` (others are ignored)."""
        return self.tokens_for(count_script_characters(text, self.script))


def count_script_characters(text: str, script: Script) -> int:
    """How many characters of `text` belong to `script` (Chinese: CJK ideographs)."""
    return sum(1 for char in text if character_class(char) == script)
