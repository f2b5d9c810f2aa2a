"""Train / validation / test splits."""

from __future__ import annotations

import pandas as pd
from sklearn.model_selection import train_test_split

STRATEGIES = ("time", "stratified")


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
            raise ValueError(f"the {name} split has a single class; use more rows or other sizes")
    return {name: part.reset_index(drop=True) for name, part in parts.items()}
