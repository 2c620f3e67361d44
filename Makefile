# The two commands of the README: `make run` and `make test`. Both set up what they need first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system-deps run test test-fast lint compile clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's Pushgateway for the metrics test (skipped with a reason when it cannot be installed).
system-deps:
	@command -v prometheus-pushgateway >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && apt-get install -y -qq prometheus-pushgateway >/dev/null) || \
	    echo "prometheus-pushgateway not installed: its test will be skipped"; }

setup: $(STAMP)

run: setup
	$(BIN)/lumos run $(ARGS)

test: setup system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(ARGS)

# The everyday loop: every test not marked slow (the whole suite stays `make test`, CI's).
test-fast: setup system-deps
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: setup
	$(BIN)/ruff format --check src components pipelines tests bench
	$(BIN)/ruff check src components pipelines tests bench
	$(BIN)/mypy

# The xl preset's compiled pipeline (kept fresh by a test), and the Pipeline/PipelineVersion
# resources of the base's ConfigMap for KFP's Kubernetes-native mode. Rerun after editing either.
# (On a cluster the lumos-deploy Job compiles the deployment's own config: nothing to generate.)
compile: setup
	$(BIN)/python -m pipelines.lumos_pipeline
	$(BIN)/python -m lumos.k8s.pipeline_resources --config-map manifests/base/pipeline-config.yaml \
	  --out manifests/overlays/kubernetes-native/pipeline.yaml

clean:
	rm -rf runs .pytest_cache
