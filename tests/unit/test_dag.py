"""The DAG tells the truth: each stage declares every module, file and param it reads.

Imports are derived from the source (AST, followed through the project's own modules), so
adding `from stages.lib.x import y` to a stage without listing stages/lib/x.py in dvc.yaml
fails here, not silently in a stale `dvc repro`.
"""

from __future__ import annotations

import ast
import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from stages.lib.project import (
    UndeclaredParamError,
    declared_params,
    pipeline_path,
    stage_params,
)

from ..conftest import ROOT

PACKAGES = ("stages", "serving")


def _resolved_stages() -> dict[str, dict]:
    """dvc.yaml with its ${vars} filled in, as DVC itself resolves it."""
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {
            stage.name: {
                "cmd": stage.cmd,
                "deps": [d.def_path for d in stage.deps if not d.def_path.endswith(".yaml")],
                "outs": [o.def_path for o in stage.outs],
            }
            for stage in repo.index.stages
        }


STAGES = _resolved_stages()


def _module_file(name: str) -> Path | None:
    path = ROOT / Path(*name.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def project_imports(module_file: Path) -> set[Path]:
    """Project modules `module_file` imports, directly or through other project modules."""
    seen: set[Path] = set()
    todo = [module_file]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for node in ast.walk(ast.parse(current.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.split(".")[0] in PACKAGES and (found := _module_file(name)):
                    if found.name != "__init__.py":
                        todo.append(found)
    return {p.relative_to(ROOT) for p in seen}


def _covered(path: Path, deps: list[str]) -> bool:
    return any(path == Path(d) or Path(d) in path.parents for d in deps)


def _stage_module(cmd: str) -> str:
    words = shlex.split(cmd)
    return words[words.index("-m") + 1]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_every_module_it_imports(stage: str) -> None:
    spec = STAGES[stage]
    module = _module_file(_stage_module(spec["cmd"]))
    assert module is not None, spec["cmd"]
    missing = sorted(str(p) for p in project_imports(module) if not _covered(p, spec["deps"]))
    assert not missing, f"stage '{stage}' imports {missing} but dvc.yaml does not list them"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_declares_no_module_it_does_not_import(stage: str) -> None:
    """The reverse: a listed module the stage never imports reruns it for nothing."""
    spec = STAGES[stage]
    imported = project_imports(_module_file(_stage_module(spec["cmd"])))
    listed = [Path(d) for d in spec["deps"] if d.endswith(".py")]
    assert sorted(map(str, set(listed) - imported)) == []


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_command_paths_are_declared(stage: str) -> None:
    """Every path a command passes is a dep or an out, and runs the project's interpreter."""
    spec = STAGES[stage]
    words = shlex.split(spec["cmd"])
    assert words[0] == "stages/python", "stages must run through the stages/python launcher"
    passed = [w for prev, w in zip(words, words[1:], strict=False) if prev.startswith("--")]
    for path in passed:
        assert _covered(Path(path), spec["deps"] + spec["outs"]) or any(
            Path(d).parent == Path(path) or Path(path) in Path(d).parents
            for d in spec["deps"] + spec["outs"]
        ), f"stage '{stage}' passes {path} without declaring it"


def test_serving_code_is_a_package_dependency() -> None:
    """The Bento is built from serving/: a change there must rebuild it."""
    assert "serving" in STAGES["package"]["deps"]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_declared_params_exist(stage: str) -> None:
    with open(ROOT / "params.yaml") as fh:
        params = yaml.safe_load(fh)
    for dotted in declared_params(stage):
        node = params
        for key in dotted.split("."):
            assert key in node, f"stage '{stage}' declares '{dotted}', absent from params.yaml"
            node = node[key]


def test_stage_params_refuse_undeclared_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    params = stage_params("split")
    assert params["split"]["strategy"] in ("time", "stratified")
    with pytest.raises(UndeclaredParamError, match="'train'.*does not declare"):
        params["train"]
    with pytest.raises(UndeclaredParamError, match="'split.nope'"):
        params["split"]["nope"]


def test_dotted_declarations_select_one_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # The real params.yaml: stage_params checks the whole file against its schema.
    (tmp_path / "dvc.yaml").write_text(
        yaml.safe_dump(
            {"stages": {"s": {"cmd": "x", "params": ["split.seed", {"params.yaml": ["package"]}]}}}
        )
    )
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    params = stage_params("s")
    with open(ROOT / "params.yaml") as fh:
        real = yaml.safe_load(fh)
    assert params["split"]["seed"] == real["split"]["seed"]
    assert params["package"] == real["package"]
    with pytest.raises(UndeclaredParamError):
        params["split"]["strategy"]


def test_paths_have_one_home() -> None:
    """Stage code names no pipeline file: paths arrive from dvc.yaml's commands."""
    with open(ROOT / "dvc.yaml") as fh:
        paths = yaml.safe_load(fh)["vars"][0]["paths"]
    for module in sorted((ROOT / "stages").rglob("*.py")):
        text = module.read_text()
        for name, path in paths.items():
            if "/" in path:  # bare words (plots) are also argument names
                assert f'"{path}' not in text, f"{module.name} hard-codes {path} ({name})"
    assert pipeline_path("bento", ROOT) == ROOT / paths["bento"]
