# fraudops: `make run` (pipeline, then the service) and `make test` are the README's contract.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 3000
SNAPSHOT_MINUTES ?= 5

export PATH := $(CURDIR)/$(BIN):$(PATH)
# Telemetry off; MLflow store and BentoML home inside the project unless the user set them.
# Written once, in stages/lib/environment.py; read (once, after setup) into every command.
RUN = env $(eval PROJECT_ENV := $$(shell $(BIN)/python -m stages.lib.environment))$(PROJECT_ENV)

.PHONY: setup system-deps run pipeline serve ui up down snapshot test test-unit coverage test-reliability lint bench bench-model bench-ranking bench-serving bench-scale bench-outcomes bench-reasons lock clean mlflow-ui push pull k8s-manifests image mlflow-server score export-labels

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --disable-pip-version-check -q -r requirements.lock
	@# A .venv linked from another checkout (tests' scratch copies) keeps that checkout's install.
	test -L $(VENV) || $(BIN)/pip install --disable-pip-version-check -q --no-deps -e .
	touch $@

# Debian packages the tests drive for real: Prometheus (+ promtool), Chromium and its
# driver, and Java for Spark (the machine image has Java 17). Needs root and apt;
# elsewhere it says what is missing, and the tests that need them skip (in CI they fail).
SYSTEM_TOOLS := prometheus promtool chromium chromedriver java
SYSTEM_PACKAGES := prometheus chromium chromium-driver openjdk-17-jre-headless
system-deps:
	@missing=""; for t in $(SYSTEM_TOOLS); do command -v $$t >/dev/null || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	else echo "system-deps: missing$$missing (Debian: apt-get install $(SYSTEM_PACKAGES))"; fi

pipeline: setup
	$(RUN) $(BIN)/dvc repro
	@echo "Pipeline done: metrics in metrics/, plots in plots/ (dvc plots show), model and Bento in models/."

run: pipeline up

# The package stage's output folder is a complete Bento: bentoml serves it as it is. Its
# path must be absolute (pipeline_path gives one): BentoML 1.4.40 joins a relative Bento
# path to itself (models/bento/models/bento) and fails with 'Failed to import module'.
BENTO_DIR = $(shell $(BIN)/python -c 'from stages.lib.project import pipeline_path; print(pipeline_path("bento"))' 2>/dev/null)

serve: setup
	@test -f "$(BENTO_DIR)/bento.yaml" || { echo "no Bento yet: run 'make pipeline' first"; exit 1; }
	@echo "serving $(BENTO_DIR) on http://$(HOST):$(PORT)"
	@$(RUN) $(BIN)/python -m stages.lib.served --bento $(BENTO_DIR)
	exec $(RUN) $(BIN)/bentoml serve $(BENTO_DIR) --host $(HOST) --port $(PORT)

# The whole local stack on loopback (service, Prometheus, UI, Grafana if installed).
up: setup system-deps
	@test -f "$(BENTO_DIR)/bento.yaml" || $(MAKE) pipeline
	$(RUN) $(BIN)/python -m monitoring.stack up

down:
	$(RUN) $(BIN)/python -m monitoring.stack down
	$(RUN) $(BIN)/python -m deploy.mlflow_server down

# The labelled decisions (the service's decision log joined to the labels POSTed to
# /feedback) into data/raw/feedback/, DVC-tracked; with data.feedback: true in params.yaml
# `dvc repro` retrains with them (`dvc exp run -S data.feedback=true` as an experiment).
FEEDBACK_DIR = $(shell $(BIN)/python -m stages.lib.project path feedback 2>/dev/null)
export-labels: setup
	$(RUN) $(BIN)/python -m stages.export_labels --out $(FEEDBACK_DIR)
	$(RUN) $(BIN)/dvc add $(FEEDBACK_DIR)

# Batch scoring with Spark from the registry: make score INPUT='data/incoming/*.csv' OUT=scored
# [MODEL=models:/fraud-detector@candidate] [MASTER=spark://host:7077]. See batch/score.py.
score: setup
	@test -n "$(INPUT)" -a -n "$(OUT)" || { echo "usage: make score INPUT='<files or glob>' OUT=<folder>"; exit 1; }
	$(RUN) $(BIN)/python -m batch.score $(INPUT) --out $(OUT) $(if $(MODEL),--model $(MODEL)) $(if $(MASTER),--master $(MASTER))

# MLflow for a team: PostgreSQL (under .run/postgres) behind `mlflow server` on
# 127.0.0.1:5001; then `export MLFLOW_TRACKING_URI=http://127.0.0.1:5001`. `make down` stops it.
mlflow-server: setup
	$(RUN) $(BIN)/python -m deploy.mlflow_server up $(if $(ARTIFACTS),--artifacts-destination $(ARTIFACTS))

ui: setup
	$(RUN) $(BIN)/streamlit run ui/app.py --server.address $(HOST) --server.port 8501 \
	  --server.headless true --browser.gatherUsageStats false --server.maxUploadSize 300

# The dashboard's panels as one PNG, from Prometheus (needs `make up` and some traffic).
snapshot: setup
	$(RUN) $(BIN)/python -m monitoring.snapshot --prometheus http://127.0.0.1:9090 --minutes $(SNAPSHOT_MINUTES) --out monitoring/snapshot.png

test: setup system-deps
	$(BIN)/ruff check .
	$(RUN) $(BIN)/python -m pytest -q

# The fast tier: pure functions, the service's ASGI pieces in-process, the doctests
# (tests/unit and the packages; no pipeline run, no server, no model search).
test-unit: setup
	$(BIN)/python -m pytest -q --ignore=tests/integration

# `make test`'s suite under coverage.py, the processes it starts included (settings and why
# in pyproject.toml); data in .coverage-data/, the total also in .coverage-data/total.txt.
# First a pass that only collects the tests, with `source`, so the folders' never-imported
# files count as 0%. Spark ends the Python workers it reuses with SIGHUP, which coverage
# can't catch: here reuse is off, so each worker ends with os._exit and saves its data.
COVERAGE_FOLDERS := stages serving batch monitoring deploy ui bench
COVERAGE := $(BIN)/python -m coverage
coverage: setup system-deps
	rm -rf .coverage-data
	$(RUN) $(COVERAGE) run --source=$$(echo $(COVERAGE_FOLDERS) | tr ' ' ,) -m pytest -q --collect-only >/dev/null
	PYSPARK_SUBMIT_ARGS="--conf spark.python.worker.reuse=false pyspark-shell" \
	  $(RUN) $(COVERAGE) run -m pytest -q; status=$$?; \
	$(COVERAGE) combine -q && $(COVERAGE) report && \
	for folder in $(COVERAGE_FOLDERS); do \
	  echo "$$folder: $$($(COVERAGE) report --include="$$folder/*" --format=total)%"; done && \
	echo "total: $$($(COVERAGE) report --format=total)%" | tee .coverage-data/total.txt; \
	exit $$status

# The reliability suite at full size: schemathesis with >= 2,000 cases, a 2-minute soak,
# the attacks and faults of issue 11; figures in docs/benchmarks/reliability.md.
test-reliability: setup
	rm -f bench/results/reliability.json
	FRAUD_FUZZ_EXAMPLES=1000 FRAUD_SOAK_SECONDS=120 \
	  FRAUD_RELIABILITY_REPORT=$(CURDIR)/bench/results/reliability.json \
	  $(RUN) $(BIN)/python -m pytest -q -m reliability tests/integration/test_service.py tests/integration/test_hostile.py \
	  tests/unit/test_serving_validation.py tests/unit/test_hostile_inputs.py tests/unit/test_connections.py
	$(RUN) $(BIN)/python -m bench.reliability

lint: setup
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: setup
	$(RUN) $(BIN)/python -m bench.pipeline
	$(MAKE) bench-serving

# Serving only: in-process runtimes, single rows vs BentoML's floor, batches, a CPU hog.
bench-serving: setup
	@command -v hey >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q hey; } \
	  || echo "bench-serving: no 'hey' (apt-get install hey): single rows use a Python client"
	@test -f "$(BENTO_DIR)/bento.yaml" || $(MAKE) pipeline
	$(RUN) $(BIN)/python -m bench.serving

# Share pipeline outputs through the DVC remote (.dvc/config; see docs/pipeline.md "Sharing artifacts").
push: setup
	$(RUN) $(BIN)/dvc push

pull: setup
	$(RUN) $(BIN)/dvc pull

# Model quality on the real first day (../shared/, skipped when absent) and the synthetic data.
# Spark local, pandas and the service on the same 1M rows: docs/benchmarks/scale.md.
bench-scale: setup
	$(RUN) $(BIN)/python -m bench.scale

bench-model: setup
	$(RUN) $(BIN)/python -m bench.model

# Do the families rank on the synthetic default as on the real first day? docs/benchmarks/ranking.md.
bench-ranking: setup
	$(RUN) $(BIN)/python -m bench.ranking

# The decision log's cost in-process (group commit, a 100k-row file, the metrics refresh at
# 1M decisions): docs/benchmarks/outcomes.md.
bench-outcomes: setup
	@command -v hey >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q hey; } \
	  || echo "bench-outcomes: no 'hey' (apt-get install hey): single rows use a Python client"
	@test -f "$(BENTO_DIR)/bento.yaml" || $(MAKE) pipeline
	$(RUN) $(BIN)/python -m bench.outcomes

bench-reasons: setup
	@command -v hey >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q hey; } \
	  || echo "bench-reasons: no 'hey' (apt-get install hey): single rows use a Python client"
	@test -f "$(BENTO_DIR)/bento.yaml" || $(MAKE) pipeline
	$(RUN) $(BIN)/python -m bench.reasons

# deploy/k8s's copies of monitoring/'s alert rules and dashboards (a test keeps them equal).
k8s-manifests: setup
	$(RUN) $(BIN)/python -m deploy.k8s.render

# The service's container image, from the Bento's generated Dockerfile. Needs a Docker
# engine (none on the CI machines): push it where your cluster pulls from.
IMAGE ?= fraud-scoring:latest
image:
	@test -f "$(BENTO_DIR)/bento.yaml" || { echo "no Bento yet: run 'make pipeline' first"; exit 1; }
	@command -v docker >/dev/null || { echo "image: needs Docker (docker build -f $(BENTO_DIR)/env/docker/Dockerfile $(BENTO_DIR))"; exit 1; }
	docker build -t $(IMAGE) -f $(BENTO_DIR)/env/docker/Dockerfile $(BENTO_DIR)

mlflow-ui: setup
	$(RUN) sh -c 'exec $(BIN)/mlflow ui --backend-store-uri "$$MLFLOW_TRACKING_URI" --host 127.0.0.1 --port 5000'

# Re-pin everything from requirements.txt (run when changing a direct dependency).
lock:
	rm -rf /tmp/fraudops-lock && $(PYTHON) -m venv /tmp/fraudops-lock
	/tmp/fraudops-lock/bin/pip install -q -r requirements.txt
	{ echo "# Pinned full set, generated by 'make lock' (pip freeze) from requirements.txt"; \
	  /tmp/fraudops-lock/bin/pip freeze; } > requirements.lock

# Removes the pipeline's outputs from the workspace (the DVC cache keeps them: `dvc checkout`).
clean:
	rm -rf $$($(BIN)/python -m stages.lib.project path prepared recent split plots model oof bento champion)
