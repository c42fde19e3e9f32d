# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed

.PHONY: demo test lint install clean bench collector jaeger prometheus validators e2e-prereqs \
	dashboards metrics-docs lowest-deps fuzz soak bench-backend bench-http bench-memory graphviz pictures \
	thanos bench-scale siege sloth slos prometheus3

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/sage-otel demo $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests tools $(wildcard examples benchmarks fuzz)
	$(BIN)/ruff format --check src tests tools $(wildcard examples benchmarks fuzz)

test: $(STAMP) lint e2e-prereqs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tests with every runtime dependency at its floor in pyproject.toml, in a venv
# cached under ~/.cache/sage-otel (scripts/lowest-deps.sh). LOWEST_DEPS_ARGS go to pytest.
lowest-deps: $(STAMP)
	@bash scripts/lowest-deps.sh $(LOWEST_DEPS_ARGS)

# Build-time generators (tools/, not in the wheel): regenerate after changing the catalog.
dashboards: $(STAMP)
	$(BIN)/python -m tools.dashboards --write

metrics-docs: $(STAMP)
	$(BIN)/python -m tools.metrics_docs --write

# collector/prometheus/alerts/sage-slos.yml from the SLO spec collector/prometheus/slos/.
slos: $(STAMP) sloth
	$(BIN)/python -m tools.slos --write

# docs/images/: the demo with its injected failures against a server agent, Prometheus and
# Jaeger v2 for 7 minutes (PICTURES_ARGS="--seconds N" to change), then the overview
# dashboard, an exemplar's trace and an alert drawn from what they stored, and the
# architecture from docs/images/architecture.dot (tools/pictures.py).
pictures: $(STAMP) jaeger prometheus3 graphviz
	@echo "pictures: about 8 minutes: 7 of demo traffic (a line every 30 s), then drawing"
	$(BIN)/python -m tools.pictures --out docs/images $(PICTURES_ARGS)

# End-to-end prerequisites, cached outside the repo (see scripts/): the collector
# distribution, Jaeger v2, Thanos and Prometheus 3 built with Go, Prometheus 2.42 from
# Debian's package.
collector:
	@bash scripts/build-collector.sh

jaeger:
	@bash scripts/build-jaeger.sh

# Debian's Prometheus 2.42 and its promtool (the remote-write path's floor).
prometheus:
	@bash scripts/ensure-prometheus.sh

# Prometheus 3 and its promtool built from Go modules: what the end-to-end tests run.
prometheus3:
	@bash scripts/build-prometheus.sh

validators:
	@bash scripts/ensure-validators.sh

graphviz:
	@bash scripts/ensure-graphviz.sh

# Thanos (receive and query), the replicated metrics store of the scale-out tiers.
thanos:
	@bash scripts/build-thanos.sh

# Sloth, which generates the SLO rules (make slos) and checks them in make test.
sloth:
	@bash scripts/build-sloth.sh

e2e-prereqs: collector jaeger prometheus prometheus3 validators graphviz thanos sloth

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis

# Everything docs/performance.md reports, each as ratios within its own run: telemetry in
# process (writes the "Latest run" section), handshakes against their crypto floor, the HTTP
# path against a bare echo, /metrics at 10,000 sessions and 1M messages, and the demo
# unthrottled with telemetry on and off. About 12 minutes.
bench: $(STAMP)
	@echo "bench: [1/5] telemetry in process, into docs/performance.md (about 12 minutes in all)"
	$(BIN)/python -m benchmarks.run --write docs/performance.md
	@echo "bench: [2/5] handshakes against their crypto floor"
	$(BIN)/python -m benchmarks.handshakes --rounds 3
	@echo "bench: [3/5] the HTTP path against a bare echo"
	$(BIN)/python -m benchmarks.http_path --rounds 3 --seconds 5
	@echo "bench: [4/5] /metrics at 10,000 sessions and 1M messages"
	$(BIN)/python -m benchmarks.scrape --sessions 10000 --messages 1000000
	@echo "bench: [5/5] the demo unthrottled, telemetry on and off"
	$(BIN)/python -m benchmarks.demo_rate --rounds 8 --seconds 10

# A coverage-guided fuzz campaign on every parser and the HTTP endpoint (docs/security.md);
# `make test` runs a short, fixed-budget one. FUZZ_RUNS executions per target.
FUZZ_RUNS ?= 100000
fuzz: $(STAMP)
	@echo "fuzz: $(FUZZ_RUNS) runs per target, 2 at a time: a row as each target ends"
	$(BIN)/python -m fuzz.run --runs $(FUZZ_RUNS) --jobs 2 --report /tmp/sage-otel-fuzz.md

# Legitimate clients against a server under attack, in separate processes (docs/security.md).
SOAK_MINUTES ?= 10
soak: $(STAMP)
	@echo "soak: about $$(( $(SOAK_MINUTES) + 2 )) minutes: 1 of baseline, $(SOAK_MINUTES) under attack (a line a minute)"
	$(BIN)/python -m benchmarks.soak --baseline-minutes 1 --minutes $(SOAK_MINUTES) --out /tmp/sage-otel-soak.json
# Each attack of docs/security.md alone against a default `sage-otel serve` while legitimate
# clients run (benchmarks/siege.py), about 5 minutes; SIEGE_ARGS="--attacker-nice 19" gives
# the attacker only the CPU the server leaves, as on another machine.
siege: $(STAMP)
	@echo "siege: about 5 minutes: a baseline, then each attack for 20 s (a line per phase)"
	$(BIN)/python -m benchmarks.siege --seconds-per-phase 20 --out /tmp/siege-result.json $(SIEGE_ARGS)

# SAGE over HTTP against a bare echo on the same stacks (uvicorn with uvloop and httptools,
# aiohttp clients), with and without telemetry.
bench-http: $(STAMP)
	$(BIN)/python -m benchmarks.http_path --rounds 3 --seconds 5

# RSS of an unthrottled `sage-otel demo` and its server process: growth after warm-up.
bench-memory: $(STAMP)
	$(BIN)/python -m benchmarks.memory --minutes 10 --warmup 2 --out /tmp/sage-otel-memory.json -- --clients 8

# Throughput and shutdown with the OTLP backend healthy, refused or a black hole (performance.md).
bench-backend: $(STAMP)
	$(BIN)/python -m benchmarks.backend_down --rounds 3 --seconds 8

# The agent's cost of tail sampling (every span exported) beside head sampling at the same
# share (docs/performance.md, docs/scaling.md).
bench-scale: $(STAMP)
	$(BIN)/python -m benchmarks.tail_vs_head --rounds 9
