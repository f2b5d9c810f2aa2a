"""Population stability of live scores and key features against the training reference.

The reference (bin edges and fractions from held-out data) travels in the contract. The
service keeps the bin counts of the most recent rows and exports one PSI per distribution;
PSI above ~0.2 is the usual sign that the population has shifted.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

from serving.contract import Reference

EPSILON = 1e-4  # floor on a bin's share, so an empty bin does not make PSI infinite


def psi(expected: np.ndarray, actual_counts: np.ndarray) -> float:
    """Population stability index of observed counts against expected fractions.

    >>> round(psi(np.array([0.5, 0.5]), np.array([50, 50])), 6)
    0.0
    >>> round(psi(np.array([0.5, 0.5]), np.array([90, 10])), 3)
    0.879
    """
    actual = np.clip(actual_counts / max(1, actual_counts.sum()), EPSILON, None)
    expected = np.clip(expected, EPSILON, None)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


class DriftWindow:
    """Bin counts of the last `window_rows` scored rows, per reference distribution."""

    def __init__(self, reference: Reference, window_rows: int) -> None:
        # Inner edges only: values below the first or above the last land in the end bins.
        self.bins = {
            name: (np.asarray(spec.edges[1:-1], float), np.asarray(spec.fractions))
            for name, spec in {"score": reference.score, **reference.features}.items()
        }
        self.window_rows = window_rows
        self.batches: deque[tuple[int, dict[str, np.ndarray]]] = deque()
        self.totals = {name: np.zeros(len(frac), np.int64) for name, (_, frac) in self.bins.items()}
        self.rows = 0
        self.lock = threading.Lock()

    def _counts(self, name: str, values: np.ndarray) -> np.ndarray:
        inner, fractions = self.bins[name]
        return np.bincount(np.searchsorted(inner, values, side="right"), minlength=len(fractions))

    def add(self, scores: np.ndarray, features: Any) -> dict[str, float]:
        """Add a scored batch; return the PSI of each distribution over the window."""
        counts = {"score": self._counts("score", scores)}
        for name in self.bins:
            if name != "score":
                counts[name] = self._counts(name, np.asarray(features[name], float))
        with self.lock:
            self.batches.append((len(scores), counts))
            self.rows += len(scores)
            for name, c in counts.items():
                self.totals[name] += c
            # Drop whole old batches while the window stays full without them.
            while len(self.batches) > 1 and self.rows - self.batches[0][0] >= self.window_rows:
                rows, old = self.batches.popleft()
                self.rows -= rows
                for name, c in old.items():
                    self.totals[name] -= c
            return {name: psi(self.bins[name][1], self.totals[name]) for name in self.bins}
