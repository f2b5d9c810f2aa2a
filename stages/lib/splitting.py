"""Train / validation / test splits."""

from __future__ import annotations

import math

import pandas as pd
from sklearn.model_selection import train_test_split

STRATEGIES = ("time", "stratified")


class SplitError(ValueError):
    """The rows cannot be split as params.yaml asks (a part would lack a class)."""


def rows_needed_per_class(
    strategy: str, valid_size: float, test_size: float, search_folds: int, calibration_folds: int
) -> int:
    """How many rows of each class (frauds, and legitimate rows) split and train need.

    Every part needs both classes: split refuses a part without them, and valid and test
    are scored. Train's search folds the train split, and its calibration folds train +
    valid: forward-chaining (time) folds cut k + 1 blocks, the first only fitted and each
    other scored, so each block needs a fraud; stratified folds need k per class.

    The answer is the smallest count for which every part's share of the class, rounded,
    covers its need (what a stratified split gives, and a time split with the class
    spread evenly in time), and never below the bare sum of the needs. It is necessary,
    not sufficient: a time split of frauds bunched in time can still leave a part short,
    which split then names. Legitimate rows are counted alike, though in fraud data they
    are never the short class.
    """
    extra_block = 1 if strategy == "time" else 0
    train_need, fit_need = search_folds + extra_block, calibration_folds + extra_block
    train_share = 1 - valid_size - test_size
    needs = [
        (train_need, train_share),
        (fit_need, train_share + valid_size),
        (1, valid_size),
        (1, test_size),
    ]
    # floor(share * n + 0.5) >= count  <=>  n >= (count - 0.5) / share
    by_share = max(math.ceil((count - 0.5) / share) for count, share in needs)
    by_count = max(train_need + 1, fit_need) + 1  # train (+ one in valid) and one in test
    return max(by_share, by_count)


def split_frame(
    frame: pd.DataFrame, strategy: str, valid_size: float, test_size: float, seed: int
) -> dict[str, pd.DataFrame]:
    """Split into train, valid and test.

    `time` keeps the order of `Time`: train on the earliest transactions, validate on the
    next, test on the latest, so no future information leaks into training. `stratified`
    shuffles with the fraud rate kept equal in every part.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"split.strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not (0 < valid_size < 1 and 0 < test_size < 1 and valid_size + test_size < 1):
        raise ValueError(
            "split.valid_size and split.test_size must be in (0, 1) with a sum below 1"
        )
    if strategy == "time":
        ordered = frame.sort_values("Time", kind="stable", ignore_index=True)
        n = len(ordered)
        train_end = int(round(n * (1 - valid_size - test_size)))
        valid_end = int(round(n * (1 - test_size)))
        parts = {
            "train": ordered.iloc[:train_end],
            "valid": ordered.iloc[train_end:valid_end],
            "test": ordered.iloc[valid_end:],
        }
    else:
        rest, test = train_test_split(
            frame, test_size=test_size, stratify=frame["Class"], random_state=seed
        )
        train, valid = train_test_split(
            rest, test_size=valid_size / (1 - test_size), stratify=rest["Class"], random_state=seed
        )
        parts = {"train": train, "valid": valid, "test": test}
    for name, part in parts.items():
        if part["Class"].nunique() < 2:
            raise SplitError(
                f"the {name} split ({len(part)} rows) has a single class: use more rows, "
                "other split sizes, or split.strategy: stratified"
            )
    return {name: part.reset_index(drop=True) for name, part in parts.items()}
