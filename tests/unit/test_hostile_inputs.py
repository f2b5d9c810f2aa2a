"""Hostile clients, round two (issue 20), in-process: error answers that stay small whatever
the input, Parquet files that would expand past the memory budget, row identity through
the file path, and log lines a client cannot forge."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from serving import logs, scoring
from serving.contract import Column, InputSchema
from serving.parquet_upload import MAX_DECODED_BYTES, footer_bytes
from stages.lib.schema import FEATURES

CONTRACT = InputSchema(
    features=[Column(name=n, valid_min=-1e6, valid_max=1e6) for n in FEATURES],
    ignored_columns=["Class"],
)


def test_an_error_lists_a_few_rows_and_counts_them_all() -> None:
    """A body of 100k items that are not objects: one small answer (it used to list one
    pydantic error per item: 72 MB for a 1 MiB body)."""
    with pytest.raises(scoring.RequestError) as caught:
        scoring.validate_records([0] * 100_000, CONTRACT, "ignore", None)
    body = caught.value.body
    assert (caught.value.status, body["rule"]) == (400, "record-type")
    assert body["rows"] == [0, 1, 2, 3, 4] and body["rows_total"] == 100_000
    assert len(json.dumps(body)) < 300
    # The same for a column whose every value breaks a rule.
    frame = pd.DataFrame({n: np.ones(50_000) for n in FEATURES}).assign(Amount=-1e9)
    with pytest.raises(scoring.RequestError) as caught:
        scoring.validate(frame, CONTRACT)
    assert caught.value.body["rows"] == [0, 1, 2, 3, 4]
    assert caught.value.body["rows_total"] == 50_000


def _write(table: pa.Table, path: Path, row_group_size: int | None = None) -> Path:
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def dictionary_bomb(path: Path, rows: int = 1_000, value_bytes: int = 1 << 20) -> Path:
    """A valid file whose text column holds one 1 MiB value in every row: tens of KB on
    disk, 1 GiB once each row has its own copy (written without ever expanding it)."""
    numbers = {n: pa.array(np.ones(rows)) for n in FEATURES}
    text = pa.DictionaryArray.from_arrays(
        pa.array(np.zeros(rows, np.int32)), pa.array(["x" * value_bytes])
    )
    return _write(pa.table({**numbers, "note": text}), path)


def null_bomb(path: Path, rows: int = 100_000_000) -> Path:
    """A few KB of RLE-encoded nulls that decode to 800 MB of float64."""
    chunk = 10_000_000
    schema = pa.schema([("Amount", pa.float64())])
    with pq.ParquetWriter(path, schema) as writer:
        for _ in range(rows // chunk):
            writer.write_table(pa.table({"Amount": pa.nulls(chunk, pa.float64())}))
    return path


# The child's own peak: VmHWM belongs to the address space exec created, whereas
# getrusage's ru_maxrss keeps the parent's high-water mark across exec (the test process
# grows while it writes a bomb, and that once read as the bomb's cost).
PEAK = """
import re, sys
from serving.scoring import RequestError, read_upload
try:
    read_upload(open(sys.argv[1], "rb").read(), "upload.parquet")
    print("read")
except RequestError as error:
    print(error.status, error.body["rule"])
status = open("/proc/self/status").read()
print(int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) * 1024)
"""


def _read_in_a_process(path: Path) -> tuple[str, int]:
    """What reading the file answers, and the peak memory of a fresh process doing it."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    return out[0], int(out[1])


@pytest.mark.parametrize("bomb", [dictionary_bomb, null_bomb])
def test_parquet_bombs_are_refused_before_they_expand(bomb, tmp_path: Path) -> None:
    frame = pd.DataFrame({n: np.ones(1_000) for n in FEATURES})
    plain = _write(pa.Table.from_pandas(frame), tmp_path / "plain.parquet")
    answer, baseline = _read_in_a_process(plain)
    assert answer == "read"
    path = bomb(tmp_path / "bomb.parquet")
    assert path.stat().st_size < 1 << 20  # read in the worker itself, under the lane's size
    answer, peak = _read_in_a_process(path)
    assert answer == "413 max-decompressed-bytes"
    assert peak - baseline < 64 << 20, f"{(peak - baseline) >> 20} MiB over a plain read"


def test_the_footer_bound_counts_decoded_values() -> None:
    rows = 300_000  # the file limit: the contract's columns fit the budget with room
    table = pa.table({n: pa.array(np.ones(rows)) for n in FEATURES})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    bound = footer_bytes(pq.ParquetFile(io.BytesIO(sink.getvalue())).metadata)
    assert rows * 8 * len(FEATURES) <= bound < MAX_DECODED_BYTES


def test_a_named_index_comes_back_as_a_column(tmp_path: Path) -> None:
    """Row identity: a Parquet file indexed by txn_id is scored with txn_id in the output."""
    frame = pd.DataFrame({n: np.ones(3) for n in FEATURES})
    frame.index = pd.Index(["a-1", "b-2", "c-3"], name="txn_id")
    data = _write(pa.Table.from_pandas(frame), tmp_path / "indexed.parquet").read_bytes()
    read = scoring.read_upload(data, "indexed.parquet")
    assert read.index.name == "txn_id" and read.index.tolist() == ["a-1", "b-2", "c-3"]
    scored = scoring.with_scores(read, pd.DataFrame({"fraud_probability": [0.1, 0.2, 0.3]}))
    for output_format in ("csv", "parquet"):
        payload, _ = scoring.write_table(scored, output_format)
        reader = pd.read_csv if output_format == "csv" else pd.read_parquet
        back = reader(io.BytesIO(payload))
        assert back.columns[0] == "txn_id" and back["txn_id"].tolist() == ["a-1", "b-2", "c-3"]


def test_no_client_string_can_break_or_forge_a_log_line() -> None:
    logs.install()
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("test.hostile")
    logger.addHandler(handler)
    try:
        forged = "/nope\n2026-01-01T00:00:00+0000 [ERROR] forged\r\x00\u2028end"
        logger.warning("GET %s", forged)
        logger.warning(forged)
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and "\x00" not in stream.getvalue()
    assert lines[0] == "GET /nope\\x0a2026-01-01T00:00:00+0000 [ERROR] forged\\x0d\\x00\\u2028end"


def test_fixed_width_and_nested_columns_are_bounded_before_reading(tmp_path: Path) -> None:
    """Fixed-width binary counts its full width; nested columns are refused from the schema
    (their pages say little of their decoded size)."""
    rows = 1_400  # 280 MB at full width, over the 256 MiB budget
    wide = pa.DictionaryArray.from_arrays(  # written dictionary-encoded, never expanded here
        pa.array(np.zeros(rows, np.int32)), pa.array([b"x" * 200_000], pa.binary(200_000))
    )
    data = _write(pa.table({"w": wide}), tmp_path / "w.parquet").read_bytes()
    assert len(data) < 1 << 20
    with pytest.raises(scoring.RequestError) as caught:
        scoring.read_upload(data, "w.parquet")
    assert caught.value.status == 413
    nested = pa.table({"n": pa.array([["a" * 1000] * 100] * 10)})
    data = _write(nested, tmp_path / "n.parquet").read_bytes()
    with pytest.raises(scoring.RequestError) as caught:
        scoring.read_upload(data, "n.parquet")
    assert (caught.value.status, caught.value.body["rule"]) == (400, "column-type")


@pytest.mark.parametrize("name", ["V1", "fraud_probability"])
def test_an_index_named_like_a_column_is_refused(name: str, tmp_path: Path) -> None:
    frame = pd.DataFrame({n: np.ones(3) for n in FEATURES})
    frame.index = pd.RangeIndex(3, name=name)
    data = _write(pa.Table.from_pandas(frame), tmp_path / "i.parquet").read_bytes()
    with pytest.raises(scoring.RequestError) as caught:
        scoring.read_upload(data, "i.parquet")
    assert (caught.value.status, caught.value.body["rule"]) == (400, "duplicate-columns")
