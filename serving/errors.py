"""The one error type of the service's checks: a rule broken, as an HTTP status and a body."""

from __future__ import annotations

from typing import Any

EXAMPLE_ROWS = 5  # offending row positions an error lists (with the count of all of them)


class RequestError(ValueError):
    """A request broke a rule. Carries the HTTP status and a JSON-ready body."""

    def __init__(
        self,
        status: int,
        rule: str,
        message: str,
        column: str | None = None,
        rows: list[int] | None = None,
        rows_total: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body: dict[str, Any] = {"error": message, "rule": rule}
        if column is not None:
            self.body["column"] = column
        if rows:
            # A few positions and a count, never one entry per bad row: a body of 16 M bad
            # items once made a 400 that listed them all (a worker went to 12 GB).
            self.body["rows"] = rows[:EXAMPLE_ROWS]
            self.body["rows_total"] = len(rows) if rows_total is None else rows_total

    @classmethod
    def from_body(cls, status: int, body: dict[str, Any]) -> RequestError:
        """Rebuild an error another process raised (it travels as plain data)."""
        error = cls(status, body["rule"], body["error"])
        error.body = dict(body)
        return error
