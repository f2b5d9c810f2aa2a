"""Open the model the Bento names, refusing anything that is not what package built.

The package stage seals the stored model: its model.yaml (BentoML's own record, read
before any file of ours) pins the md5 of every file the service loads, contract.json
included. An edited contract used to be served as it was (a threshold of 0.5 silently; V1
and V2 swapped gave other probabilities with 200; a dropped feature gave a 500 with an ONNX
traceback on every request). Now any difference, a missing or unreadable file, or a
contract that does not fit its model stops the service at start, in one line naming the
file and the cause. (A seal, not a signature: someone who can rewrite model.yaml too is
trusted, as with the code in the Bento.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from serving.contract import Contract, ContractError
from serving.runtime import OnnxRuntime, Runtime, SklearnRuntime

SEAL = "sealed"  # the key of model.yaml's metadata: {file name: md5}
REBUILD = "rebuild the Bento with `dvc repro package`"


def refuse(message: str) -> SystemExit:
    """What stops the service: one line, never a traceback."""
    return SystemExit(f"fraud_scoring: {message}")


def open_sealed(model: Any) -> tuple[Any, Contract]:
    """The stored model and its contract, once every sealed file is checked."""
    try:
        stored = model.resolve()
        seal = stored.info.metadata.get(SEAL)
    except Exception as exc:  # BentoML's errors: a missing model or an unreadable model.yaml
        raise refuse(f"cannot open the model {model.tag}: {_first_line(exc)}") from None
    if not isinstance(seal, dict) or "contract.json" not in seal:
        raise refuse(f"the model {stored.tag} is not sealed (no md5 of its files); {REBUILD}")
    for name, md5 in seal.items():
        check_file(Path(stored.path_of(name)), str(md5))
    try:
        contract = Contract.read(stored.path_of("contract.json"))
    except ContractError as exc:
        raise refuse(str(exc)) from None
    pinned = {"model.pkl": contract.lineage.model_md5}
    if contract.runtime.onnx is not None:
        pinned[contract.runtime.onnx.file] = contract.runtime.onnx.md5
    for name, md5 in pinned.items():
        if seal.get(name) != md5:
            raise refuse(f"the contract's md5 of {name} ({md5}) is not the sealed one; {REBUILD}")
    return stored, contract


def check_file(path: Path, md5: str) -> None:
    try:
        actual = hashlib.md5(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise refuse(f"cannot read {path}: {exc.strerror}") from None
    if actual != md5:
        raise refuse(f"{path} is corrupt or replaced (md5 {actual}, sealed {md5}); {REBUILD}")


def check_fits(runtime: Runtime, contract: Contract) -> None:
    """The model takes exactly the contract's features (count, and names where the model
    kept them), so a mismatch stops the start instead of failing every request."""
    names = list(contract.feature_names)
    taken: int | None = None
    if isinstance(runtime, OnnxRuntime):
        shape = runtime.small.get_inputs()[0].shape
        taken = shape[1] if len(shape) == 2 and isinstance(shape[1], int) else None
    elif isinstance(runtime, SklearnRuntime):
        taken = getattr(runtime.model, "n_features_in_", None)
        kept = getattr(runtime.model, "feature_names_in_", None)
        if kept is not None and list(kept) != names:
            raise refuse(f"the model was fitted on other columns than the contract's; {REBUILD}")
    if taken is not None and taken != len(names):
        raise refuse(f"the model takes {taken} features, the contract names {len(names)}; "
                     f"{REBUILD}")  # fmt: skip


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
