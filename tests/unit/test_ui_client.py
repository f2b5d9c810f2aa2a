"""The UI client's pure logic (ui/client.py); against a real service, and the page itself:
tests/integration/test_ui.py."""

from __future__ import annotations

import numpy as np
import pytest

from serving.contract import Costs
from ui import client


def test_threshold_summary() -> None:
    p = np.array([0.9, 0.6, 0.2, 0.01])
    costs = Costs(cost_missed_fraud=100.0, cost_false_alarm=5.0)  # as the contract holds them
    labelled = client.threshold_summary(p, 0.5, costs, np.array([1, 0, 1, 0]))
    assert (labelled["flagged"], labelled["true_positives"], labelled["false_negatives"]) == (
        2,
        1,
        1,
    )
    assert labelled["expected_cost"] == 105.0 and labelled["precision"] == 0.5
    unlabelled = client.threshold_summary(p, 0.5, costs)
    assert unlabelled["expected_cost"] == pytest.approx(0.1 * 5 + 0.4 * 5 + 0.2 * 100 + 0.01 * 100)
