"""The typed contract (serving/contract.py): built by package's code, read back exactly,
and refused in one line when it is not one this code can serve."""

from __future__ import annotations

import json

import pytest

from serving.contract import Contract, ContractError, Limits, PublishedContract

from .contract_fixture import small_model


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Contract:
    return small_model(tmp_path_factory.mktemp("model"))[0]


def test_round_trip_is_exact(contract: Contract, tmp_path) -> None:
    path = tmp_path / "contract.json"
    path.write_bytes(contract.to_json())
    assert Contract.read(path) == contract
    assert Contract.read(path).to_json() == contract.to_json()


def _one_line_error(raw: bytes) -> str:
    with pytest.raises(ContractError) as refused:
        Contract.parse(raw)
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_unknown_version_is_refused_in_one_line(contract: Contract) -> None:
    data = json.loads(contract.to_json())
    data["contract_version"] = 2
    assert "contract_version 2" in _one_line_error(json.dumps(data).encode())
    del data["contract_version"]
    assert "contract_version None" in _one_line_error(json.dumps(data).encode())


def test_truncated_or_malformed_contracts_are_refused_in_one_line(contract: Contract) -> None:
    raw = contract.to_json()
    assert "not valid JSON" in _one_line_error(raw[: len(raw) // 2])
    assert "not a JSON object" in _one_line_error(b"[1, 2]")
    data = json.loads(raw)
    del data["threshold"]
    assert "threshold" in _one_line_error(json.dumps(data).encode())
    data = json.loads(raw)
    data["features"][0]["valid_min"] = "low"
    assert "features.0.valid_min" in _one_line_error(json.dumps(data).encode())
    data = json.loads(raw)
    data["surprise"] = 1  # a field this code does not know is not silently served
    assert "surprise" in _one_line_error(json.dumps(data).encode())


def test_read_of_a_missing_file_is_one_line(tmp_path) -> None:
    with pytest.raises(ContractError, match="cannot read"):
        Contract.read(tmp_path / "absent.json")


def test_published_contract_leaves_out_the_reference(contract: Contract) -> None:
    limits = Limits(
        max_rows_per_request=1, max_json_rows_per_request=1, max_payload_bytes=1,
        max_json_payload_bytes=1, body_timeout_seconds=1.0, unknown_columns="ignore",
    )  # fmt: skip
    published = PublishedContract.of(contract, "sklearn", "fraud_model:abc", limits)
    dumped = published.model_dump(mode="json")
    assert "reference" not in dumped and dumped["runtime"]["serving"] == "sklearn"
    assert published.feature_names == contract.feature_names
    # A client reads what a newer service adds without failing.
    assert PublishedContract.model_validate({**dumped, "new_field": 1}) == published
