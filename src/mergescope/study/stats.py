"""Uncertainty for the study: means with 95% intervals over replicates, and paired comparisons.

Every number the report compares is measured on several replicates (training seeds, pairs, data
orders). ``interval`` summarises one quantity (Student-t interval of the mean); ``compare`` decides
whether one condition beats another from the paired per-replicate differences, and says "tie
within noise" when the interval of the difference contains 0. The report's sentences are built
from these verdicts only, so they cannot claim more than the numbers show.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

CONFIDENCE = 0.95


@functools.lru_cache(maxsize=256)
def _t_quantile(dof: int, confidence: float = CONFIDENCE) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, dof))


@dataclass(frozen=True)
class Interval:
    """Mean of ``n`` replicate values with a two-sided Student-t interval (``half`` is None for n < 2)."""

    mean: float
    half: float | None
    n: int
    values: tuple[float, ...]

    @property
    def low(self) -> float | None:
        return None if self.half is None else self.mean - self.half

    @property
    def high(self) -> float | None:
        return None if self.half is None else self.mean + self.half

    def excludes_zero(self) -> bool:
        return self.half is not None and (self.low > 0 or self.high < 0)

    def text(self, digits: int = 3, scale: float = 1.0) -> str:
        """'0.123 ± 0.045' (or just the mean for a single replicate)."""
        mean = f"{scale * self.mean:.{digits}f}"
        return mean if self.half is None else f"{mean} ± {scale * self.half:.{digits}f}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["values"] = list(self.values)
        d["low"], d["high"] = self.low, self.high
        return d


def interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean and t-interval of replicate values (sample standard deviation, n - 1 degrees of freedom)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("interval of no values")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return Interval(mean, None, n, tuple(xs))
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    return Interval(mean, _t_quantile(n - 1, confidence) * sd / math.sqrt(n), n, tuple(xs))


@dataclass(frozen=True)
class Comparison:
    """A vs B over paired replicates: the interval of A - B and the verdict it supports."""

    a: str
    b: str
    difference: Interval
    higher_is_better: bool

    @property
    def winner(self) -> str | None:
        """The better of the two when the interval of the difference excludes 0, else None (a tie)."""
        if not self.difference.excludes_zero():
            return None
        a_larger = self.difference.mean > 0
        return self.a if a_larger == self.higher_is_better else self.b

    def sentence(self, what: str, digits: int = 3, scale: float = 1.0, unit: str = "", verb: str = "beats") -> str:
        """'A beats B on <what> by d (95% CI [lo, hi], n=3)' with the gap oriented in the winner's favour,
        or 'A and B tie within noise on <what> (A - B = d, 95% CI [lo, hi], n=3)'."""
        d = self.difference
        on = f" on {what}" if what else ""
        if d.half is None:
            return f"{self.a} vs {self.b}{on}: one replicate only, no comparison possible"
        if self.winner is None:
            ci = f"95% CI [{scale * d.low:+.{digits}f}, {scale * d.high:+.{digits}f}]{unit}, n={d.n}"
            return (f"{self.a} and {self.b} tie within noise{on} "
                    f"(difference {scale * d.mean:+.{digits}f}{unit}, {ci})")
        sign = 1.0 if d.mean > 0 else -1.0  # the gap in the winner's favour is positive
        low, high = sorted((sign * scale * d.low, sign * scale * d.high))
        loser = self.b if self.winner == self.a else self.a
        return (f"{self.winner} {verb} {loser}{on} by {sign * scale * d.mean:.{digits}f}{unit} "
                f"(95% CI [{low:.{digits}f}, {high:.{digits}f}]{unit}, n={d.n})")

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "difference": self.difference.to_dict(),
                "higher_is_better": self.higher_is_better, "winner": self.winner}


def compare(a: str, a_values: Sequence[float], b: str, b_values: Sequence[float],
            higher_is_better: bool = True) -> Comparison:
    """Paired comparison: replicate i of A is compared with replicate i of B (same seeds, same data)."""
    if len(a_values) != len(b_values):
        raise ValueError(f"paired comparison needs equal replicate counts ({len(a_values)} vs {len(b_values)})")
    return Comparison(a, b, interval([x - y for x, y in zip(a_values, b_values)]), higher_is_better)
