"""Restart policy: capped exponential delay between failed starts (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from disaggd.topology import SupervisorSection


@dataclass(frozen=True)
class Backoff:
    """Delay before the next start after `failures` failures in a row.

    Attributes:
        initial: delay after the first failure, seconds (> 0).
        factor: growth per further failure (>= 1).
        maximum: cap, seconds.
    """

    initial: float
    factor: float
    maximum: float

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.maximum <= 0:
            raise ValueError("backoff delays must be positive")
        if self.factor < 1:
            raise ValueError("backoff factor must be >= 1")

    def delay(self, failures: int) -> float:
        """Seconds to wait before the next start: ``initial * factor**(failures-1)``, capped.

        Raises:
            ValueError: `failures` < 1 (there is nothing to back off from).
        """
        if failures < 1:
            raise ValueError(f"failures must be >= 1, got {failures}")
        delay = self.initial
        # Multiply step by step and stop at the cap: factor**failures can overflow a float.
        for _ in range(failures - 1):
            delay *= self.factor
            if delay >= self.maximum:
                return self.maximum
        return min(delay, self.maximum)

    @classmethod
    def from_config(cls, sup: SupervisorSection) -> Backoff:
        """The policy of a ``[supervisor]`` section (backoff_initial/factor/max)."""
        return cls(sup.backoff_initial, sup.backoff_factor, sup.backoff_max)
