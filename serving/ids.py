"""Transaction ids: the client's, checked, or assigned as `<request id>:<row>`.

An id joins a score to its transaction, to the decision log and to the label that comes
back weeks later, so it must be short, printable, unambiguous in CSV, and unique within a
request (a duplicate would make a label attach to the wrong row).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from serving.contract import ID_COLUMN, ID_RULE
from serving.errors import EXAMPLE_ROWS, RequestError

PATTERN = r"[A-Za-z0-9._:-]{1,64}"


def transaction_ids(
    given: Sequence[Any] | pd.Series | None, rows: int, request_id: str
) -> np.ndarray:
    """One id per row: the client's where given (missing ones are assigned), all assigned
    when `given` is None. Raises RequestError naming the rows of a bad or repeated id."""
    assigned = np.array([f"{request_id}:{row}" for row in range(rows)], dtype=object)
    if given is None:
        return assigned
    values = pd.Series(list(given) if not isinstance(given, pd.Series) else given.to_numpy(),
                       dtype=object)  # fmt: skip
    missing = values.isna().to_numpy()
    text = values.map(_as_text)
    bad = ~missing & ~text.str.fullmatch(PATTERN, na=False).to_numpy()
    if bad.any():
        raise _refused("transaction-id", f"'{ID_COLUMN}' must be {ID_RULE}", bad)
    repeated = ~missing & text.duplicated(keep=False).to_numpy()
    if repeated.any():
        raise _refused("duplicate-ids", f"'{ID_COLUMN}' repeats within the request", repeated)
    return np.where(missing, assigned, text.to_numpy(dtype=object))


def _as_text(value: Any) -> Any:
    """A string as it is, an integer in decimal; anything else (floats, booleans, objects)
    stays as it is and fails the pattern."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
        return str(int(value))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))  # a Parquet integer column with nulls reads as floats
    return None if value is None else f"\x00{type(value).__name__}"


def _refused(rule: str, message: str, mask: np.ndarray) -> RequestError:
    rows = [int(i) for i in np.flatnonzero(mask)[:EXAMPLE_ROWS]]
    return RequestError(400, rule, message, column=ID_COLUMN, rows=rows,
                        rows_total=int(mask.sum()))  # fmt: skip


def file_ids(frame: pd.DataFrame) -> pd.Series | None:
    """The ids a file brings: its transaction_id column, or an index of that name."""
    if ID_COLUMN in frame.columns:
        return frame[ID_COLUMN]
    if frame.index.name == ID_COLUMN:
        return pd.Series(frame.index)
    return None
