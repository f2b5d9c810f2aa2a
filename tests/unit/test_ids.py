"""Transaction ids (serving/ids.py): the client's kept, the missing assigned, bad or
repeated ones refused naming the rows; CSV ids stay as written."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from serving import scoring
from serving.contract import ID_COLUMN
from serving.ids import file_ids, transaction_ids


def test_given_ids_are_kept_and_missing_ones_assigned() -> None:
    ids = transaction_ids(["a-1", None, 42, np.nan], 4, "req")
    assert ids.tolist() == ["a-1", "req:1", "42", "req:3"]
    assert transaction_ids(None, 2, "req").tolist() == ["req:0", "req:1"]


@pytest.mark.parametrize(
    ("given", "rule", "rows"),
    [
        (["ok", "has space", "x" * 65, 1.5, True, {"a": 1}], "transaction-id", [1, 2, 3, 4, 5]),
        (["a", "b", "a", "c", "b"], "duplicate-ids", [0, 1, 2, 4]),
        (["1", 1], "duplicate-ids", [0, 1]),  # an integer is its decimal string
    ],
)
def test_bad_or_repeated_ids_are_refused_naming_the_rows(given, rule, rows) -> None:
    with pytest.raises(scoring.RequestError) as caught:
        transaction_ids(given, len(given), "req")
    body = caught.value.body
    assert (caught.value.status, body["rule"], body["column"]) == (400, rule, ID_COLUMN)
    assert body["rows"] == rows and body["rows_total"] == len(rows)


def test_csv_ids_stay_as_written_and_an_index_of_that_name_counts() -> None:
    frame = scoring.read_upload(b"transaction_id,Time\n007,1\n8,2\n", "t.csv")
    assert file_ids(frame).tolist() == ["007", "8"]
    indexed = pd.DataFrame({"Time": [1.0]}, index=pd.Index(["t-1"], name=ID_COLUMN))
    assert file_ids(indexed).tolist() == ["t-1"]
    assert file_ids(pd.DataFrame({"Time": [1.0]})) is None
