"""Which registry version a Bento serves, and whether the registry has moved on since.

    python -m stages.lib.served --bento models/bento      (`make serve` runs it first)

The Bento knows its model only by content (the contract's md5); the registry maps that
md5 to a version. A Bento built before another experiment moved `champion` still serves
the old model: this says so, with the command that rebuilds it. It only warns (exit 0):
a pulled clone's empty registry, or an unreachable server, must not stop serving.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from serving.contract import Contract, Lineage


def served_lineage(bento: Path) -> Lineage:
    """The lineage in the contract of the model the Bento serves."""
    meta = yaml.safe_load((bento / "bento.yaml").read_text())
    name, version = meta["args"]["model_tag"].split(":")
    return Contract.read(bento / "models" / name / version / "contract.json").lineage


def report(bento: Path) -> list[str]:
    """One line on what is served, and a warning line when the champion is another model."""
    from stages.lib.project import configure_environment

    configure_environment()
    import mlflow

    from stages.lib.registry import champion_version, version_for

    lineage = served_lineage(bento)
    name, md5 = lineage.registered_model, lineage.model_md5
    where = mlflow.get_tracking_uri()
    try:
        served, champion = version_for(name, md5), champion_version(name)
    except Exception as exc:  # noqa: BLE001 - any registry failure only means "unknown"
        return [f"serving {name} md5 {md5}; the registry at {where} did not answer ({exc})"]
    if served is None:
        return [f"serving {name} md5 {md5}, which the registry at {where} does not hold"]
    lines = [f"serving {name} v{served.version} (md5 {md5}) from {where}"]
    if champion is not None and champion.tags.get("model_md5") != md5:
        lines.append(
            f"WARNING: the registry's champion is now {name} v{champion.version} "
            f"(md5 {champion.tags.get('model_md5')}), not the served v{served.version}: "
            "run `dvc repro` to build its Bento"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bento", type=Path, required=True, help="an exported Bento folder")
    args = parser.parse_args(argv)
    for line in report(args.bento):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
