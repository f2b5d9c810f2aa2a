"""The published OpenAPI, made to say what the service really takes and answers.

BentoML derives `/docs.json` from the Python signatures: a transaction is "any object",
`detail` is a string (BentoML sends an array), and 401/408/413/415/422/429/503 are
missing while 404 and 500 are listed. A schema-driven fuzzer then never reaches the
model. Here the contract (columns, ranges) and the settings (limits, API key) are
written into the document the service publishes.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

from serving.contract import ID_COLUMN, REASONS_COLUMN, Contract, InputSchema
from serving.reasons import MAX_REASONS
from serving.settings import Settings

ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string", "description": "what was wrong, for a person"},
        "rule": {"type": "string", "description": "the rule broken, for a program"},
        "column": {"type": "string"},
        "rows": {
            "type": "array",
            "items": {"type": "integer", "minimum": 0},
            "maxItems": 5,
            "description": "0-based positions of the first offending rows (at most 5)",
        },  # fmt: skip
        "rows_total": {"type": "integer", "minimum": 1, "description": "how many rows break it"},
        "request_id": {"type": "string"},
        "detail": {
            "type": "array",
            "items": {"type": "object"},
            "description": "request-schema errors found by BentoML",
        },  # fmt: skip
    },
}
STATUSES = {
    "400": "a rule of the contract or of the request format is broken (see rule)",
    "401": "missing or wrong API key (only when FRAUD_API_KEY is set)",
    "408": "the body did not arrive within FRAUD_BODY_TIMEOUT_S",
    "413": "over a size limit: bytes, rows or decompressed size",
    "415": "a content type or file type this route does not take",
    "422": "a value outside the model's valid range, or reasons this model cannot give",
    "429": "all scoring slots are busy; retry after Retry-After seconds",
}
THRESHOLD = {  # OpenAPI 3.0 (BentoML's): `nullable`, not a type list
    "type": "number",
    "nullable": True,
    "minimum": 0,
    "maximum": 1,
    "description": "decision threshold; the contract's cost-optimal one if absent",
}
REASONS = {
    "type": "integer",
    "nullable": True,
    "minimum": 0,
    "maximum": MAX_REASONS,
    "description": "each row's top-k features by contribution to the raw score (exact, from "
    "the stored model); at most FRAUD_MAX_REASON_ROWS rows per request",
}
REASON = {
    "type": "object",
    "required": ["feature", "value", "contribution"],
    "properties": {
        "feature": {"type": "string"},
        "value": {"type": "number", "description": "as sent"},
        "contribution": {"type": "number", "description": "signed, in reasons_unit"},
    },
}


def transaction_schema(contract: InputSchema, unknown_columns: str) -> dict[str, Any]:
    """One transaction: every contract column, a number inside its valid range."""
    properties = {}
    for spec in contract.features:
        number: dict[str, Any] = {"type": "number"}
        if spec.valid_min is not None:
            number["minimum"] = spec.valid_min
        if spec.valid_max is not None:
            number["maximum"] = spec.valid_max
        properties[spec.name] = number
    return {
        "type": "object",
        "required": list(properties),
        "properties": properties,
        "additionalProperties": unknown_columns != "reject",
    }


def describe(spec: dict[str, Any], contract: Contract, settings: Settings) -> dict[str, Any]:
    """`spec` (BentoML's document) with the real request schemas and statuses."""
    spec = json.loads(json.dumps(spec))  # a copy
    spec.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    predict = spec["paths"]["/predict"]["post"]
    upload = spec["paths"]["/predict_file"]["post"]
    explain = spec["paths"]["/explain"]["post"]
    _describe_predict(predict, contract, settings)
    _describe_explain(explain, contract, settings)
    _describe_upload(upload, settings)
    for operation, extra in ((predict, {}), (explain, {}),
                             (upload, {"503": "the file scorer restarted"})):  # fmt: skip
        _describe_statuses(operation, extra, settings)
    if settings.api_key is not None:
        spec["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for operation in (predict, explain, upload):
            operation["security"] = [{"bearer": []}]
    return spec


def _json_request(operation: dict[str, Any], contract: Contract, settings: Settings,
                  max_rows: int, fields: dict[str, Any]) -> None:  # fmt: skip
    """A JSON body of `transactions` (each a contract row, at most max_rows) and `fields`."""
    operation["requestBody"]["required"] = True
    operation["requestBody"]["content"]["application/json"]["schema"] = {
        "type": "object",
        "required": ["transactions"],
        "properties": {
            "transactions": {
                "type": "array",
                "minItems": 1,
                "maxItems": max_rows,
                "items": transaction_schema(contract, settings.unknown_columns),
            },
            **fields,
        },
    }


def _describe_predict(predict: dict[str, Any], contract: Contract, settings: Settings) -> None:
    _json_request(predict, contract, settings, settings.max_json_rows,
                  {"threshold": THRESHOLD, "reasons": REASONS})  # fmt: skip
    predict["responses"]["200"]["content"]["application/json"]["schema"] = {
        "type": "object",
        "required": ["predictions", "threshold", "model_tag", "request_id"],
        "properties": {
            "predictions": {"type": "array", "items": {
                "type": "object",
                "required": [ID_COLUMN, "fraud_probability", "is_fraud", "risk_band"],
                "properties": {
                    ID_COLUMN: {"type": "string", "description": "the client's, or assigned"},
                    "fraud_probability": {"type": "number", "minimum": 0, "maximum": 1},
                    "is_fraud": {"type": "boolean"},
                    "risk_band": {"type": "string",
                                  "enum": [b.name for b in contract.risk_bands]},
                    REASONS_COLUMN: {"type": "array", "items": REASON},
                },
            }},
            "threshold": {"type": "number"},
            "model_tag": {"type": "string"},
            "request_id": {"type": "string"},
            "lineage": {"type": "object"},
            "reasons_unit": {"type": "string", "enum": ["log-odds", "probability"]},
        },
    }  # fmt: skip


def _describe_explain(explain: dict[str, Any], contract: Contract, settings: Settings) -> None:
    reasons = {**REASONS, "minimum": 1, "nullable": False, "default": 3}
    _json_request(explain, contract, settings, settings.max_reason_rows, {"reasons": reasons})
    explain["responses"]["200"]["content"]["application/json"]["schema"] = {
        "type": "object",
        "required": ["explanations", "reasons_unit", "model_tag", "request_id"],
        "properties": {
            "explanations": {"type": "array", "items": {
                "type": "object",
                "required": [ID_COLUMN, REASONS_COLUMN],
                "properties": {ID_COLUMN: {"type": "string"},
                               REASONS_COLUMN: {"type": "array", "items": REASON}},
            }},
            "reasons_unit": {"type": "string", "enum": ["log-odds", "probability"]},
            "model_tag": {"type": "string"},
            "request_id": {"type": "string"},
        },
    }  # fmt: skip


def _describe_upload(upload: dict[str, Any], settings: Settings) -> None:
    form = upload["requestBody"]["content"]["multipart/form-data"]
    form["schema"]["properties"]["output_format"] = {"type": "string", "enum": ["csv", "parquet"],
                                                     "default": "csv"}  # fmt: skip
    form["schema"]["properties"]["threshold"] = THRESHOLD
    form["schema"]["properties"]["reasons"] = REASONS
    form["schema"]["additionalProperties"] = False
    upload["requestBody"]["required"] = True
    form["schema"]["properties"]["file"]["description"] = (
        "CSV (the real creditcard.csv format included) or Parquet with the contract's "
        f"columns; at most {settings.max_rows} rows and {settings.max_bytes} bytes"
    )
    upload["responses"]["200"]["content"]["application/vnd.apache.parquet"] = {
        "schema": {"type": "string", "format": "binary"}
    }


def _describe_statuses(
    operation: dict[str, Any], extra: dict[str, str], settings: Settings
) -> None:
    responses = operation["responses"]
    for status in ("404", "500"):  # never for these routes: no 500 is a promise
        responses.pop(status, None)
    for status, description in {**STATUSES, **extra}.items():
        if status == "401" and settings.api_key is None:
            continue
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }


class PublishedSchema:
    """ASGI middleware: answers GET /docs.json with describe() of BentoML's document."""

    def __init__(self, app: Any, contract: Contract, settings: Settings) -> None:
        self.app, self.contract, self.settings = app, contract, settings
        self.cached: dict[str, Any] | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") != "/docs.json":
            return await self.app(scope, receive, send)
        if self.cached is None:
            body = bytearray()

            async def keep(message: dict) -> None:
                if message["type"] == "http.response.body":
                    body.extend(message.get("body", b""))

            await self.app(scope, receive, keep)
            self.cached = describe(json.loads(body), self.contract, self.settings)
        await JSONResponse(self.cached)(scope, receive, send)
