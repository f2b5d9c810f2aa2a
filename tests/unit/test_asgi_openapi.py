"""The published OpenAPI document (serving/openapi.py) in-process: PublishedSchema in
front of an app that answers /docs.json with the skeleton BentoML 1.4 generates for the
two routes; what a client reads is the contract's real request schema and statuses."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serving.openapi import PublishedSchema, describe, transaction_schema
from serving.settings import Settings

from .contract_fixture import small_model


def bentoml_skeleton() -> dict:
    """The parts of BentoML's generated document that describe() rewrites."""

    def json_op() -> dict:
        return {
            "requestBody": {"content": {"application/json": {"schema": {}}}},
            "responses": {"200": {"content": {"application/json": {"schema": {}}}}, "500": {}},
        }

    upload = {
        "requestBody": {
            "content": {"multipart/form-data": {"schema": {"properties": {"file": {}}}}}
        },
        "responses": {"200": {"content": {"text/csv": {}}}, "404": {}},
    }
    return {"openapi": "3.0.2", "paths": {"/predict": {"post": json_op()},
                                          "/explain": {"post": json_op()},
                                          "/predict_file": {"post": upload}}}  # fmt: skip


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory):
    return small_model(tmp_path_factory.mktemp("model"))[0]


def test_request_schema_is_the_contract(contract) -> None:
    schema = transaction_schema(contract, "reject")
    assert schema["required"] == contract.feature_names
    assert schema["additionalProperties"] is False
    for feature in contract.features:
        number = schema["properties"][feature.name]
        assert (number["minimum"], number["maximum"]) == (feature.valid_min, feature.valid_max)
    assert transaction_schema(contract, "ignore")["additionalProperties"] is True


def test_statuses_promise_no_500_and_401_only_with_a_key(contract) -> None:
    open_doc = describe(bentoml_skeleton(), contract, Settings.from_env({}))
    keyed = describe(bentoml_skeleton(), contract, Settings.from_env({"FRAUD_API_KEY": "k"}))
    for doc in (open_doc, keyed):
        for route in ("/predict", "/explain", "/predict_file"):
            responses = doc["paths"][route]["post"]["responses"]
            assert "500" not in responses and "404" not in responses
            assert {"400", "413", "415", "422", "429"} <= responses.keys()
    assert "401" not in open_doc["paths"]["/predict"]["post"]["responses"]
    assert "401" in keyed["paths"]["/predict"]["post"]["responses"]
    assert keyed["paths"]["/predict"]["post"]["security"] == [{"bearer": []}]
    item = open_doc["paths"]["/predict"]["post"]["responses"]["200"]["content"][
        "application/json"]["schema"]["properties"]["predictions"]["items"]  # fmt: skip
    assert item["properties"]["risk_band"]["enum"] == [b.name for b in contract.risk_bands]


def test_middleware_answers_docs_json_and_asks_the_app_once(contract) -> None:
    calls = []

    async def docs(request: Request) -> JSONResponse:
        calls.append(1)
        return JSONResponse(bentoml_skeleton())

    app = Starlette(routes=[Route("/docs.json", docs), Route("/other", docs)])
    middleware = PublishedSchema(app, contract=contract, settings=Settings.from_env({}))

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=middleware)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.get(path) for path in ("/docs.json", "/docs.json", "/other")]

    first, second, other = asyncio.run(go())
    assert first.status_code == 200 and first.json() == second.json()
    body = first.json()["paths"]["/predict"]["post"]["requestBody"]
    assert body["required"] is True
    assert other.json() == bentoml_skeleton()  # other paths pass through untouched
    assert len(calls) == 2  # /docs.json built once, then cached; /other once
