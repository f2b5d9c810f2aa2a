"""score: batch-score CSV or Parquet files with Spark, from the MLflow registry.

    python -m batch.score 'data/incoming/*.csv' --out scored/ [--model models:/name@alias]
                          [--master local[*] | spark://... | yarn | k8s://...] [--conf k=v]
                          [--reasons K]

The model is a registered version (default: the `champion` of params.yaml's registered
model) with the serving contract the package stage attached to it; both are checked by
md5. Each input file is a partition `batch=<file name>` of two Parquet datasets:

    <out>/scored/   the input's columns (contract columns as checked float64), fraud_probability,
                    is_fraud, risk_band, threshold, model_name, model_version, model_md5,
                    source_file; with --reasons K, a `reasons` column: each row's top-K
                    features by contribution, as the service gives them ("V14 = -9.1 (+2.3)")
    <out>/rejects/  rows that broke a contract rule: reject_rule, reject_column, reject_reason
                    and raw_record (the values as read) instead of the scores
    <out>/_summary.json   rows, scored, flagged and rejected per rule and per file; time
                          (seconds, of which spark_start_seconds before the first read)

A rerun over the same files replaces their partitions and leaves other files' partitions
alone (dynamic partition overwrite), so it is idempotent. A file with no rejects this
time loses its old rejects partition. Whole-file problems (a contract column missing, a
column named like an output) stop the job before anything is written.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import re
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from serving.contract import OUTPUT_COLUMNS, REASONS_COLUMN, Contract
from serving.reasons import MAX_REASONS
from stages.lib.project import setup_logging

ROOT = Path(__file__).resolve().parents[1]

log = logging.getLogger("fraudops.batch")
SCORES = list(OUTPUT_COLUMNS)
REJECTS = ["reject_rule", "reject_column", "reject_reason", "raw_record"]
LINEAGE = ["threshold", "model_name", "model_version", "model_md5", "source_file"]
# The code executors import, shipped to them as a zip (a cluster has no project checkout).
# batch/worker.py and every serving module it imports (scoring.py's own imports included)
SHIPPED = ["serving/contract.py", "serving/errors.py", "serving/parquet_upload.py",
           "serving/scoring.py", "serving/runtime.py", "serving/reasons.py",
           "batch/worker.py"]  # fmt: skip


class JobError(RuntimeError):
    """A problem with the inputs or the model that stops the job before it writes."""


def default_model() -> str:
    """The registered version the workspace's Bento serves (the champion record package
    built it from), so this job and `make serve` score with the same model unless --model
    says otherwise; `@champion` where there is no record. Warns when the registry's
    champion has moved on since (`dvc repro` rebuilds the Bento for it)."""
    from stages.lib.project import configure_environment, pipeline_path
    from stages.lib.registry import champion_version, version_for

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    name = params["evaluate"]["registered_model"]
    record = pipeline_path("champion", ROOT)
    if not record.is_file():
        return f"models:/{name}@champion"
    configure_environment()
    md5 = json.loads(record.read_text())["model_md5"]
    served, champion = version_for(name, md5), champion_version(name)
    if served is None:
        return f"models:/{name}@champion"
    if champion is not None and champion.version != served.version:
        log.warning(
            "scoring with %s v%s, which the service's Bento serves; the registry's champion "
            "is now v%s (`dvc repro` rebuilds the Bento for it; --model models:/%s@champion "
            "scores with it here)",
            name,
            served.version,
            champion.version,
            name,
        )
    return f"models:/{name}/{served.version}"


def code_zip(folder: Path) -> Path:
    """SHIPPED as an importable zip (packages get an __init__.py there)."""
    path = folder / "fraudops_batch.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name in SHIPPED:
            archive.write(ROOT / name, name)
        for package in {Path(name).parent.as_posix() for name in SHIPPED}:
            archive.writestr(f"{package}/__init__.py", "")
    return path


def spark_session(master: str, conf: dict[str, str]):
    from pyspark.sql import SparkSession

    # Executors' Python is the project's (PYSPARK_PYTHON); otherwise Spark picks any python3.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = (
        SparkSession.builder.master(master)
        .appName("fraudops-score")
        .config("spark.sql.sources.partitionOverwriteMode", "dynamic")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "true")  # stage progress bars on stderr
    )
    # SPARK-55965: PySpark 4.3 warns on every pandas >= 3 import. The job's Arrow path is
    # checked instead: the tests compare every column's type and every probability.
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
    if master.startswith("local"):  # nothing listens beyond loopback on one machine
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.config("spark.driver.host", "127.0.0.1").config(
            "spark.driver.bindAddress", "127.0.0.1"
        )
    for key, value in conf.items():
        builder = builder.config(key, value)
    return builder.getOrCreate()


def read_inputs(spark, paths: list[str], fmt: str):
    """The files as one DataFrame with each row's source_file and batch (file name)."""
    from pyspark.sql import functions as F
    from pyspark.sql.types import StringType, StructField, StructType

    from batch.worker import CORRUPT

    if fmt == "csv":
        # Every column as text, parsed by the contract's own rules on the executors; each
        # file's header is checked against the first's (enforceSchema off), and a line
        # with the wrong number of fields lands in CORRUPT instead of shifting values.
        header = spark.read.option("header", True).csv(paths).schema
        schema = StructType([*header.fields, StructField(CORRUPT, StringType())])
        frame = (
            spark.read.schema(schema)
            .option("header", True)
            .option("enforceSchema", False)
            .option("mode", "PERMISSIVE")
            .option("columnNameOfCorruptRecord", CORRUPT)
            .csv(paths)
        )
    else:
        frame = spark.read.parquet(*paths)
    path = F.col("_metadata.file_path")
    return frame.withColumn("source_file", path).withColumn(
        "batch", F.regexp_extract(path, r"([^/]+?)(\.[^./]*)?$", 1)
    )


def check_inputs(frame, features: list[str]) -> list[str]:
    """The input files, once the columns and file names are fit to score."""
    from batch.worker import ADDED

    columns = set(frame.columns)
    missing = [name for name in features if name not in columns]
    if missing:
        raise JobError(f"the input lacks contract columns: {', '.join(missing)}")
    outputs = set(OUTPUT_COLUMNS) | set(ADDED.names) | set(LINEAGE[:-1]) | {REASONS_COLUMN}
    taken = sorted(columns & outputs)
    if taken:
        raise JobError(f"input columns clash with the job's output columns: {', '.join(taken)}")
    files = frame.inputFiles()
    names = [Path(f).stem for f in files]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise JobError(f"input files share a name (one partition each): {', '.join(clashes)}")
    return files


def _on_executor(
    batches: Iterator[Any], contract: dict[str, Any], model_file: str, md5: str, reasons: int
) -> Iterator[Any]:
    from pyspark import SparkFiles

    from batch.worker import score_batches

    yield from score_batches(batches, contract, SparkFiles.get(model_file), md5, reasons)


def _delete(spark, uri: str) -> None:
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).delete(path, True)


def _write_text(spark, uri: str, text: str) -> None:
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(uri)
    stream = path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).create(path, True)
    try:
        stream.write(bytearray(text.encode()))
    finally:
        stream.close()


def run_job(
    inputs: list[str],
    out: str,
    model_uri: str,
    master: str,
    conf: dict[str, str],
    fmt: str,
    reasons: int = 0,
) -> dict[str, Any]:
    from stages.lib.registry import resolve

    started = time.monotonic()
    model = resolve(model_uri)
    log.info("model %s v%d (md5 %s), threshold %.4f", model.name, model.version, model.md5,
             model.contract.threshold)  # fmt: skip
    spark = spark_session(master, conf)
    spark_start = time.monotonic() - started
    try:
        with tempfile.TemporaryDirectory() as scratch:
            spark.sparkContext.addPyFile(str(code_zip(Path(scratch))))
            spark.sparkContext.addFile(str(model.model_file))
            scored = score_inputs(spark, model, inputs, fmt, reasons).persist()  # written twice
            counts = _counts(scored)
            log.info("scored in %.1f s; writing", time.monotonic() - started)
            write_outputs(spark, scored, counts, out.rstrip("/"))
            scored.unpersist()
            summary = _summary(counts, model, model.contract, inputs, master, started)
            summary["spark_start_seconds"] = round(spark_start, 1)
            _write_text(
                spark, f"{out.rstrip('/')}/_summary.json", json.dumps(summary, indent=2) + "\n"
            )
            return summary
    finally:
        spark.stop()


def score_inputs(spark: Any, model: Any, inputs: list[str], fmt: str, reasons: int = 0) -> Any:
    """The input files as one Spark DataFrame, scored on the executors, with the model's
    identity on every row (lazy: nothing runs until it is written or counted)."""
    from pyspark.sql import functions as F
    from pyspark.sql.pandas.types import from_arrow_schema, to_arrow_schema

    from batch.worker import output_schema

    features = model.contract.feature_names
    frame = read_inputs(spark, inputs, fmt)
    files = check_inputs(frame, features)
    log.info("%d %s file(s) to score with Spark %s on %s", len(files), fmt, spark.version,
             spark.sparkContext.master)  # fmt: skip
    schema = output_schema(to_arrow_schema(frame.schema), features, reasons)
    on_executor = partial(_on_executor, contract=model.contract, reasons=reasons,
                          model_file=model.model_file.name, md5=model.md5)  # fmt: skip
    return frame.mapInArrow(on_executor, from_arrow_schema(schema)).select(
        "*",
        F.lit(model.contract.threshold).alias("threshold"),
        F.lit(model.name).alias("model_name"),
        F.lit(str(model.version)).alias("model_version"),
        F.lit(model.md5).alias("model_md5"),
    )


def _counts(scored: Any) -> list[Any]:
    """Rows and flagged rows per input file and reject rule (None: scored)."""
    from pyspark.sql import functions as F

    flagged = F.sum(F.col("is_fraud").cast("int")).alias("flagged")
    return scored.groupBy("batch", "reject_rule").agg(F.count("*").alias("rows"), flagged).collect()


def write_outputs(spark: Any, scored: Any, counts: list[Any], target: str) -> None:
    """Scored rows under scored/, rejected rows under rejects/, one partition per input
    file; a file that now has no rejects loses its old rejects partition."""
    from pyspark.sql import functions as F

    good = F.col("reject_rule").isNull()
    scored.filter(good).drop(*REJECTS).write.mode("overwrite").partitionBy("batch").parquet(
        f"{target}/scored"
    )
    with_rejects = {row["batch"] for row in counts if row["reject_rule"] is not None}
    for batch in sorted({row["batch"] for row in counts} - with_rejects):
        _delete(spark, f"{target}/rejects/batch={batch}")  # a rerun may have fixed this file
    if with_rejects:
        rejected = scored.filter(~good).drop(*SCORES)
        rejected.write.mode("overwrite").partitionBy("batch").parquet(f"{target}/rejects")


def _summary(
    counts: list[Any], model: Any, contract: Contract, inputs: list[str], master: str,
    started: float,
) -> dict[str, Any]:  # fmt: skip
    per_file: dict[str, dict[str, Any]] = {}
    for row in counts:
        entry = per_file.setdefault(row["batch"], {"rows": 0, "scored": 0, "flagged": 0,
                                                   "rejected": {}})  # fmt: skip
        entry["rows"] += row["rows"]
        if row["reject_rule"] is None:
            entry["scored"] += row["rows"]
            entry["flagged"] += int(row["flagged"] or 0)
        else:
            entry["rejected"][row["reject_rule"]] = row["rows"]
    rejected: dict[str, int] = {}
    for entry in per_file.values():
        for rule, n in entry["rejected"].items():
            rejected[rule] = rejected.get(rule, 0) + n
    return {
        "model": f"models:/{model.name}/{model.version}",
        "model_md5": model.md5,
        "threshold": contract.threshold,
        "inputs": inputs,
        "master": master,
        "rows": sum(e["rows"] for e in per_file.values()),
        "scored": sum(e["scored"] for e in per_file.values()),
        "flagged": sum(e["flagged"] for e in per_file.values()),
        "rejected": dict(sorted(rejected.items())),
        "files": dict(sorted(per_file.items())),
        "seconds": round(time.monotonic() - started, 1),
    }


def input_format(inputs: list[str], chosen: str) -> str:
    if chosen != "auto":
        return chosen
    kinds = {Path(p.rstrip("/*")).suffix.lower().lstrip(".") for p in inputs}
    if kinds <= {"csv"}:
        return "csv"
    if kinds <= {"parquet", "pq"}:
        return "parquet"
    raise JobError(f"cannot tell the format of {inputs} from the names: pass --format")


def check_local_inputs(inputs: list[str]) -> None:
    """Every local input is a file, a folder with files, or a glob that matches some.

    Checked before Spark starts, which would report a missing path as PATH_NOT_FOUND in a
    Java and a Python traceback. URIs with a scheme (s3a://, hdfs://, file:) and brace
    globs ({a,b}, which Python's glob lacks) are left to Spark.
    """
    for spec in inputs:
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", spec) or "{" in spec:
            continue
        if any(char in spec for char in "*?["):
            if not glob.glob(spec):
                raise JobError(f"no input file matches {spec!r}")
        elif not os.path.exists(spec):
            raise JobError(f"no such input file or folder: {spec!r}")
        elif os.path.isdir(spec) and all(n.startswith(("_", ".")) for n in os.listdir(spec)):
            # Spark skips names starting with _ or . too, then fails to infer a schema.
            raise JobError(f"input folder {spec!r} holds no files to score")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("inputs", nargs="+", help="files, folders or globs; local, hdfs://, s3a://")
    parser.add_argument("--out", required=True, help="output folder (local, hdfs://, s3a://)")
    parser.add_argument("--model", default=None, help="models:/<name>@<alias> or /<version>")
    parser.add_argument("--master", default="local[*]", help="Spark master URL")
    parser.add_argument("--format", choices=("auto", "csv", "parquet"), default="auto")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="Spark configuration (repeatable)")  # fmt: skip
    parser.add_argument("--reasons", type=int, default=0, choices=range(MAX_REASONS + 1),
                        metavar="K", help=f"top-K reasons per row (0-{MAX_REASONS})")  # fmt: skip
    args = parser.parse_args(argv)
    setup_logging()
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        conf = dict(item.split("=", 1) for item in args.conf)
        check_local_inputs(args.inputs)
        summary = run_job(
            args.inputs, args.out, args.model or default_model(), args.master, conf,
            input_format(args.inputs, args.format), args.reasons,
        )  # fmt: skip
    except (JobError, LookupError, ValueError) as problem:
        print(f"score: {problem}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in summary.items() if k != "files"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
