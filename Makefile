# Thin task runner; the scripts under scripts/ hold anything longer than a line.
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup generate check-generate lint test run bench bench-quick bench-smoke clean

setup: $(STAMP)                 ## venv + every dependency (Debian redis-server too)
$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt scripts/setup.sh
	scripts/setup.sh

generate: $(STAMP)              ## regenerate clients/python from protos/
	$(BIN)/buf generate

check-generate: $(STAMP)        ## fail if generated code drifted from protos/
	scripts/check-generate.sh

lint: $(STAMP)                  ## buf lint + format, ruff, mypy --strict
	$(BIN)/buf lint && $(BIN)/buf format --diff --exit-code
	$(BIN)/ruff check . && $(BIN)/ruff format --check .
	$(BIN)/mypy server clients/python/korero/client

test: lint check-generate       ## everything CI runs
	$(BIN)/pytest

run: $(STAMP)                   ## Redis (if none), simulated upstream, server
	scripts/run.sh

bench: $(STAMP)                 ## benchmarks (see bench/README.md); never run by CI
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]' && $(BIN)/python -m bench

bench-quick: $(STAMP)           ## every scenario at small sizes (a few minutes)
	$(BIN)/pip install -q -c constraints.txt -e '.[bench]' && $(BIN)/python -m bench scenarios --quick

bench-smoke: $(STAMP)           ## the load tool against a real server, report checked (seconds)
	$(BIN)/pytest -q tests/bench

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache
