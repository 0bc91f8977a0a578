# Thin task runner; the scripts under scripts/ hold anything longer than a line.
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WEB    := clients/web
WEB_STAMP := $(WEB)/node_modules/.installed
WEB_SRC   := $(shell find $(WEB)/src $(WEB)/static protos -type f -not -path '*/gen/*' 2>/dev/null) \
             $(WEB)/build.mjs $(WEB)/buf.gen.yaml $(WEB)/tsconfig.json scripts/build-web.sh

.PHONY: setup web generate check-generate lint test test-fast test-redis-cluster validate-deploy run run-cluster bench bench-quick bench-smoke clean

setup: $(STAMP) $(WEB_STAMP)    ## venv + every dependency (Debian redis-server, chromium too)
$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt scripts/setup.sh
	scripts/setup.sh
$(WEB_STAMP): $(WEB)/package.json $(WEB)/package-lock.json scripts/setup-web.sh
	scripts/setup-web.sh

web: $(WEB)/dist/app.js         ## build the chat page and the ops page into clients/web/dist
$(WEB)/dist/app.js: $(STAMP) $(WEB_STAMP) $(WEB_SRC)
	scripts/build-web.sh

generate: $(STAMP)              ## regenerate clients/python from protos/
	$(BIN)/buf generate

check-generate: $(STAMP)        ## fail if generated code drifted from protos/
	scripts/check-generate.sh

lint: $(STAMP)                  ## buf lint + format, ruff, mypy --strict, envoy --mode validate
	$(BIN)/buf lint && $(BIN)/buf format --diff --exit-code
	$(BIN)/envoy --mode validate -c envoy/envoy.yaml --disable-hot-restart -l error
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/mypy server clients/python/korero/client

test: lint check-generate web   ## everything CI runs (browser tests and the Redis Cluster run included)
	$(BIN)/pytest
	$(MAKE) --no-print-directory test-redis-cluster

test-redis-cluster: $(STAMP)    ## tests/server's fast tests again, on a private 3-primary Redis Cluster
	KORERO_TEST_REDIS=cluster $(BIN)/pytest -m "not slow" -q tests/server

test-fast: $(STAMP)             ## the suite without the process-spawning `slow` tests, on every core (< 60 s)
	PYTHONDONTWRITEBYTECODE= $(BIN)/pytest -m "not slow" -q -n auto  # with bytecode caches: each worker imports the tree

validate-deploy: $(STAMP)       ## Dockerfile, compose, k8s overlays, alert rules, dashboard (offline; part of test)
	$(BIN)/pytest -q tests/deploy

run: $(STAMP) web               ## Redis (if none), simulated upstream, server, Envoy + chat page
	scripts/run.sh

run-cluster: $(STAMP) web       ## the same with 3 instances behind one Envoy (RUN_TLS=1: TLS + mTLS)
	scripts/run-cluster.sh

bench: $(STAMP)                 ## benchmarks (see bench/README.md); never run by CI
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]' && $(BIN)/python -m bench

bench-quick: $(STAMP)           ## every scenario at small sizes (a few minutes)
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]' && $(BIN)/python -m bench scenarios --quick

bench-smoke: $(STAMP)           ## the load tool against a real server, report checked (seconds)
	$(BIN)/pytest -q tests/bench

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache artifacts $(WEB)/node_modules $(WEB)/dist $(WEB)/src/gen
