# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test lint install clean bench collector jaeger prometheus validators e2e-prereqs

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sage-otel demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests $(wildcard examples benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard examples benchmarks)

test: $(STAMP) lint e2e-prereqs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# End-to-end prerequisites, cached outside the repo (see scripts/): the collector
# distribution and Jaeger v2 built with Go, Prometheus from Debian's package.
collector:
	@bash scripts/build-collector.sh

jaeger:
	@bash scripts/build-jaeger.sh

prometheus:
	@bash scripts/ensure-prometheus.sh

validators:
	@bash scripts/ensure-validators.sh

e2e-prereqs: collector jaeger prometheus validators

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run --write docs/performance.md
