"""Token estimates that learn how the provider counts.

ratekit estimates a prompt's tokens before the call (tiktoken's o200k, or a
heuristic); the provider counts with its own tokenizer and says how many it
counted in the answer's ``usage``. `Calibration` keeps, per model, the ratio of
the two over recent calls and scales every later estimate by the largest of
them, so that reservations cover the provider's own counts whatever its
tokenizer. Until a model has answered `WARM_CALLS` times, estimates are scaled
by at least `PRIOR_FACTOR`: the first calls err safe.

A ratio is taken as ``(reported + OFFSET) / (estimate + OFFSET)``, and an estimate
scaled as ``(estimate + OFFSET) x factor - OFFSET``: the few tokens a tokenizer
adds or drops around a tiny prompt do not inflate the factor for large ones.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

# Until this many answers of a model reported their prompt tokens, estimates are
# scaled by at least PRIOR_FACTOR. Tokenizers differ by up to about 2x on real text
# (the mock provider counts 1.37x ratekit's heuristic on the plain English of the tests);
# what a generous prior reserves too much comes back when each call settles with the
# provider's own count (`PromptEstimate.counted`), so it costs only while in flight.
WARM_CALLS = 8
PRIOR_FACTOR = 2.0
# Ratios kept per model: the factor follows the workload as it changes.
KEPT_RATIOS = 256
# Above the largest ratio seen: what the next prompt may add to it.
HEADROOM = 1.02
OFFSET = 8.0
DEFAULT_MODEL = "default"
# A factor from the fleet beyond this is taken for garbage.
MAX_FACTOR = 100.0


@dataclass(frozen=True, slots=True)
class EstimateStatistics:
    """How far one model's prompt estimates were from the provider's counts.

    `calls` answers reported their prompt tokens; `factor` is what estimates are
    scaled by now; `mean_ratio`, `min_ratio` and `max_ratio` are the provider's
    count over ratekit's raw estimate for the recent calls (1.2: the provider
    counted 20 % more); `short` calls were reserved fewer prompt tokens than the
    provider counted.
    """

    calls: int
    factor: float
    mean_ratio: float
    min_ratio: float
    max_ratio: float
    short: int


class _Model:
    __slots__ = ("asked", "calls", "fleet", "learned", "ratios", "sent", "sent_at", "short")

    def __init__(self) -> None:
        self.ratios: deque[float] = deque(maxlen=KEPT_RATIOS)
        self.calls = 0
        self.short = 0
        # The largest recent ratio times HEADROOM (0: nothing answered yet).
        self.learned = 0.0
        # The largest factor the account's other pods learned (0: none known).
        self.fleet = 0.0
        # What this pod last shared, and after how many answers.
        self.sent = 0.0
        self.sent_at = 0
        # Reservations made while neither this pod nor the fleet knew the model.
        self.asked = 0

    @property
    def factor(self) -> float:
        if self.calls >= WARM_CALLS:
            return max(self.learned, self.fleet)
        if self.fleet:
            return max(self.learned, self.fleet)  # another pod has learned it already
        return max(self.learned, PRIOR_FACTOR)


# A pod shares its factor again when it moved by more than this, or after SHARE_EVERY
# answers (so that the fleet's value stays fresh); a pod that knows nothing of a model
# asks the fleet when it first meets it and again every ASK_EVERY reservations.
SHARE_CHANGE = 0.01
SHARE_EVERY = 64
ASK_EVERY = 16


class Calibration:
    """Per model, the factor that prompt estimates are scaled by; learns from answers.

    One per `Scheduler` (`Scheduler.estimates`); plain state of one event loop.
    `share`, when given (a scheduler on a shared backend), is called with this pod's
    learned factors whenever they change, and the fleet's come back through
    `fleet_learned`: a pod scales by the largest factor any pod of the account
    learned, and a new pod starts from the fleet's instead of the prior.
    """

    __slots__ = ("_models", "_share")

    def __init__(self, share: Callable[[dict[str, float]], None] | None = None) -> None:
        self._models: dict[str, _Model] = {}
        self._share = share

    def _model(self, model: str | None, *, ask: bool = True) -> _Model:
        key = DEFAULT_MODEL if model is None else model
        found = self._models.get(key)
        if found is None:
            found = self._models[key] = _Model()
            if ask and self._share is not None:
                self._share({})  # ask the fleet what it learned of this model
        return found

    def factor(self, model: str | None) -> float:
        """What prompt estimates of `model` are scaled by now."""
        return self._model(model).factor

    def reserve(self, model: str | None, estimate: float) -> float:
        """The prompt tokens to reserve for a prompt estimated at `estimate`."""
        if estimate <= 0:
            return estimate
        state = self._model(model)
        if self._share is not None and state.calls < WARM_CALLS and not state.fleet:
            state.asked += 1
            if state.asked % ASK_EVERY == 0:
                self._share({})
        # A prompt is never free: a factor below 1 on a prompt of a few tokens (an
        # embedding's "hello") would otherwise reserve a negative amount.
        return max(math.ceil((estimate + OFFSET) * state.factor - OFFSET), 1)

    def observe(self, model: str | None, estimate: float, reserved: float, reported: float) -> None:
        """The provider counted `reported` prompt tokens for a prompt estimated at
        `estimate` and reserved as `reserved`."""
        if not (estimate >= 0 and reported >= 0) or math.isinf(reported):
            return
        state = self._model(model)
        state.calls += 1
        if reported > reserved:
            state.short += 1
        state.ratios.append((reported + OFFSET) / (estimate + OFFSET))
        state.learned = max(state.ratios) * HEADROOM
        share = self._share
        if share is None or state.calls < WARM_CALLS:
            return
        moved = abs(state.learned - state.sent) > SHARE_CHANGE * state.learned
        if moved or state.calls - state.sent_at >= SHARE_EVERY:
            state.sent, state.sent_at = state.learned, state.calls
            share({DEFAULT_MODEL if model is None else model: state.learned})

    def fleet_learned(self, factors: Mapping[str, float]) -> None:
        """The largest fresh factor of each model over the account's pods (theirs and
        ours); a model missing from `factors` has no fresh factor in the fleet."""
        for name, state in self._models.items():
            if name not in factors:
                state.fleet = 0.0
        for name, factor in factors.items():
            if math.isfinite(factor) and 0 < factor <= MAX_FACTOR:
                self._model(name, ask=False).fleet = factor

    def statistics(self) -> dict[str, EstimateStatistics]:
        """Per model that answered at least once: how far its estimates were off."""
        out = {}
        for name, state in self._models.items():
            if not state.ratios:
                continue
            ratios = state.ratios
            out[name] = EstimateStatistics(
                calls=state.calls,
                factor=state.factor,
                mean_ratio=sum(ratios) / len(ratios),
                min_ratio=min(ratios),
                max_ratio=max(ratios),
                short=state.short,
            )
        return out


class PromptEstimate:
    """One call's prompt estimate: what was estimated and reserved, learned from once
    the answer says what the provider counted. `output` is the call's output cap."""

    __slots__ = ("_calibration", "_done", "estimate", "model", "output", "reserved")

    def __init__(
        self,
        calibration: Calibration,
        model: str | None,
        estimate: float,
        output: float = 0,
        ceiling: float = math.inf,
    ) -> None:
        self._calibration = calibration
        self.model = model
        self.estimate = estimate
        self.output = output
        # Scaled, but never so far that a call the limits admit would be refused as too
        # large (`ceiling`: the most tokens one call may ask for).
        scaled = calibration.reserve(model, estimate)
        self.reserved = min(scaled, max(estimate, ceiling - output))
        self._done = False

    def counted(self, reported: float | None) -> float | None:
        """What a provider that reserves at arrival counted for the call, from its count of
        the prompt (`reported`, None: not said): that count plus the output cap."""
        if reported is None:
            return None
        return reported + self.output

    def learn(self, reported: float | None) -> None:
        """The provider counted `reported` prompt tokens (None: the answer did not say)."""
        if reported is None or self._done:
            return
        self._done = True
        self._calibration.observe(self.model, self.estimate, self.reserved, reported)
