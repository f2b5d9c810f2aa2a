"""Read an uploaded Parquet file under a memory budget counted as the reader expands it.

A Parquet footer's sizes are those of the encoded pages. Dictionary encoding and RLE make
the two differ without bound: a 281 KB file whose string column holds one long value in
every row read as 1 GiB (and was scored, peak 4.7 GB in one process); a 477-byte file of
RLE-encoded nulls allocated ~1.1 GB before it was refused. So the budget is checked twice,
each time before anything of that size exists:

1. from the footer alone: every value of a fixed-width column costs its decoded width
   (8 bytes, as numbers end up in float64), every text value its offsets plus the
   column's decoded pages, with text columns kept dictionary-encoded by the reader;
2. after that read, the text the dictionaries would expand to (the sum of each row's
   value length, computed from the dictionary and the indices), before it is expanded.

Within the budget the file reads as before: plain text columns, pandas' index restored.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.errors import RequestError

# 300k rows of the contract (31 float64 columns) are ~75 MB decoded.
MAX_DECODED_BYTES = 256 * 1024 * 1024
VALUE_BYTES = 8  # a decoded number (pandas' float64 or int64), or one text value's offsets
FIXED = {"BOOLEAN", "INT32", "INT64", "INT96", "FLOAT", "DOUBLE"}


def read_bounded(
    data: bytes,
    max_columns: int,
    check_schema: Callable[[pa.Schema], None] = lambda schema: None,
    budget: int = MAX_DECODED_BYTES,
) -> pa.Table:
    """The file as an Arrow table, or RequestError (413) if decoding it would pass `budget`.
    `check_schema` sees the file's columns before anything is read (nested ones, whose
    pages say little of their size, are refused there)."""
    parquet = pq.ParquetFile(io.BytesIO(data))
    metadata = parquet.metadata
    if metadata.num_columns > max_columns:
        raise RequestError(400, "max-columns", f"the file has {metadata.num_columns} columns; "
                           f"the limit is {max_columns}")  # fmt: skip
    check_schema(parquet.schema_arrow)
    _refuse_over(footer_bytes(metadata), budget)
    text = [f.name for f in parquet.schema_arrow if _is_text(f.type)]
    table = pq.ParquetFile(io.BytesIO(data), read_dictionary=text).read()
    expanded = sum(_expanded_text_bytes(table.column(name)) for name in text)
    _refuse_over(_fixed_bytes(table, text) + expanded, budget)
    for name in text:
        index = table.schema.get_field_index(name)
        column = table.column(index)
        if pa.types.is_dictionary(column.type):
            decoded = pa.chunked_array(
                [chunk.dictionary_decode() for chunk in column.chunks],
                type=column.type.value_type,
            )
            table = table.set_column(index, name, decoded)
    return table


def footer_bytes(metadata: pq.FileMetaData) -> int:
    """What reading the file can allocate at most, from its footer alone."""
    total = 0
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(group.num_columns):
            chunk = group.column(c)
            if chunk.physical_type in FIXED:
                total += chunk.num_values * VALUE_BYTES
            elif chunk.physical_type == "FIXED_LEN_BYTE_ARRAY":  # each value its full width
                width = metadata.schema.column(c).length
                total += chunk.num_values * (max(width, 0) + VALUE_BYTES)
            else:  # text: its decoded pages (dictionary kept) plus indices or offsets
                total += chunk.total_uncompressed_size + chunk.num_values * VALUE_BYTES
    return total


def _refuse_over(decoded: int, budget: int) -> None:
    if decoded > budget:
        raise RequestError(413, "max-decompressed-bytes", f"the file decodes to at least "
                           f"{decoded} bytes; the limit is {budget}")  # fmt: skip


def _is_text(kind: pa.DataType) -> bool:
    """Text or bytes, plain or dictionary-encoded (a file written from pandas or Arrow
    stores its dictionary types in the footer, and the reader restores them)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    return any(
        check(kind)
        for check in (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
                      pa.types.is_large_binary)
    )  # fmt: skip


def _expanded_text_bytes(column: pa.ChunkedArray) -> int:
    """The bytes a dictionary-encoded text column holds once each row has its own value."""
    if not pa.types.is_dictionary(column.type):
        return column.nbytes
    total = 0
    for chunk in column.chunks:
        lengths = pc.binary_length(chunk.dictionary)
        total += (pc.sum(pc.take(lengths, chunk.indices)).as_py() or 0) + len(chunk) * 4
    return total


def _fixed_bytes(table: pa.Table, text: list[str]) -> int:
    return sum(table.column(name).nbytes for name in table.column_names if name not in text)
