# nsqjobs: `make run` starts the local stack, `make test` runs the suite (both set up first).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN_DIR := $(CURDIR)/.bin
DATA_DIR ?= $(CURDIR)/.data
NSQ_APPS := nsqd nsqlookupd nsqadmin nsq_tail to_nsq

# Every port of the local stack; override any of them from the environment.
export NSQJOBS_NSQD_TCP_PORT ?= 4150
export NSQJOBS_NSQD_HTTP_PORT ?= 4151
export NSQJOBS_LOOKUPD_TCP_PORT ?= 4160
export NSQJOBS_LOOKUPD_HTTP_PORT ?= 4161
export NSQJOBS_NSQADMIN_PORT ?= 4171
export NSQJOBS_GATEWAY_PORT ?= 8080
# NSQJOBS_WORKERS local workers; worker N serves metrics on NSQJOBS_WORKER_PORT + N - 1.
export NSQJOBS_WORKERS ?= 2
export NSQJOBS_WORKER_PORT ?= 9101
# Workers drain for NSQJOBS_GRACE_S on Ctrl-C; the whole stack stops within 15 s.
export NSQJOBS_GRACE_S ?= 10
# nsqd, nsqlookupd and nsqadmin log level in the local stack (debug, info, warn, error).
export NSQJOBS_NSQ_LOG_LEVEL ?= warn
# The job ledger of the local stack: SQLite in the data directory (empty: no ledger; or a
# postgresql:// URL of a server of your own). Not exported: only `make run` hands it to its
# gateway (STACK_ENV), so the tests' own gateways never inherit it.
NSQJOBS_LEDGER_URL ?= sqlite:///$(DATA_DIR)/ledger.sqlite3

.PHONY: help venv nsq run ctl test lint bench chaos clean images standins compose-test

help:
	@echo "make run    set up (venv, NSQ build) and start the local stack in the foreground"
	@echo "make ctl    supervisorctl against the running stack (CMD=status by default)"
	@echo "make test   set up and run the whole test suite"
	@echo "make lint   ruff + mypy --strict (service, workers, tests, bench)"
	@echo "make bench  run the benchmarks, figures into bench/results/ (with the peers: Celery, Dramatiq, RQ, IPython Parallel)"
	@echo "make chaos  the chaos suite (faults under load, ~7 min): bench/results/chaos.md"
	@echo "make nsq    build NSQ v1.3.0 into .bin/ (or link binaries found on PATH)"
	@echo "make images        build the nsqjobs image (docker compose build)"
	@echo "make standins      build local stand-ins for images Docker Hub cannot serve here"
	@echo "make compose-test  run only the docker compose tests (tests/test_compose.py)"

$(VENV)/.installed: pyproject.toml setup.py $(wildcard workers/nsqjobs_tasks/kernels/*.pyx workers/nsqjobs_tasks/kernels/*.pxd)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "nsqjobs needs Python >= 3.11 (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev,ladder]'
	@touch $@

venv: $(VENV)/.installed

# NSQ: binaries on PATH are linked as they are; otherwise built from the wrapper module in
# deploy/nsq (go.sum committed), which repeats nsq's replace line so the build works.
nsq: $(addprefix .bin/,$(NSQ_APPS))

.bin/%:
	@mkdir -p .bin
	@if command -v $* >/dev/null 2>&1; then \
		ln -sf "$$(command -v $*)" $@ && echo "nsq: using $$(command -v $*)"; \
	elif command -v go >/dev/null 2>&1; then \
		echo "nsq: building $* v1.3.0" && \
		(cd deploy/nsq && GOFLAGS=-mod=mod go build -o $(BIN_DIR)/ github.com/nsqio/nsq/apps/$*); \
	else \
		echo "nsq: $* not found: install Go >= 1.21 (to build NSQ v1.3.0) or put the NSQ binaries on PATH" >&2; \
		exit 1; \
	fi

# The environment every supervisord/supervisorctl invocation of the local stack needs.
STACK_ENV = NSQJOBS_NSQD_TCP_ADDRESS=127.0.0.1:$(NSQJOBS_NSQD_TCP_PORT) \
	NSQJOBS_NSQD_HTTP_ADDRESS=127.0.0.1:$(NSQJOBS_NSQD_HTTP_PORT) \
	NSQJOBS_LOOKUPD_HTTP_ADDRESS=127.0.0.1:$(NSQJOBS_LOOKUPD_HTTP_PORT) \
	NSQJOBS_BIN_DIR=$(BIN_DIR) NSQJOBS_DATA_DIR=$(DATA_DIR) NSQJOBS_VENV=$(CURDIR)/$(VENV) \
	NSQJOBS_STOP_WAIT_S=$$(( $${NSQJOBS_GRACE_S%.*} + 3 )) \
	NSQJOBS_LEDGER_URL='$(NSQJOBS_LEDGER_URL)'
LAST_WORKER_PORT = $$(( $(NSQJOBS_WORKER_PORT) + $(NSQJOBS_WORKERS) - 1 ))

# A program that cannot start stops the stack (deploy/local/watchdog.py writes why to
# stack-failed): then `make run` prints that one line and exits 1.
# SIGTERM to make (not only Ctrl-C to the terminal's process group) stops the stack too: the
# recipe's shell runs supervisord in the background and hands it TERM, INT and HUP.
STACK_PORTS := NSQJOBS_NSQD_TCP_PORT NSQJOBS_NSQD_HTTP_PORT NSQJOBS_LOOKUPD_TCP_PORT \
	NSQJOBS_LOOKUPD_HTTP_PORT NSQJOBS_NSQADMIN_PORT NSQJOBS_GATEWAY_PORT NSQJOBS_WORKER_PORT
run: venv nsq
	@case "$(NSQJOBS_WORKERS)" in ''|*[!0-9]*|0) echo "make run: NSQJOBS_WORKERS must be a whole number >= 1, got '$(NSQJOBS_WORKERS)'" >&2; exit 2;; esac
	@for v in $(STACK_PORTS); do p=$${!v}; \
	  case "$$p" in ''|*[!0-9]*|??????*) p=x;; esac; \
	  if [ "$$p" = x ] || [ "$$p" -lt 1 ] || [ "$$p" -gt 65535 ]; then \
	    echo "make run: $$v must be a port number (1-65535), got '$${!v}'" >&2; exit 2; fi; \
	done
	@if [ -S $(DATA_DIR)/supervisor.sock ] && $(STACK_ENV) $(VENV)/bin/supervisorctl -c deploy/local/supervisord.conf pid >/dev/null 2>&1; then \
	  echo "make run: a stack from an earlier make run is still running on $(DATA_DIR) (stop it: make ctl CMD=shutdown)" >&2; exit 1; fi
	@mkdir -p $(DATA_DIR)/nsqd
	@rm -f $(DATA_DIR)/stack-failed
	@echo "nsqjobs local stack"
	@echo "  gateway      http://127.0.0.1:$(NSQJOBS_GATEWAY_PORT)  (API, /metrics, /openapi.json)"
	@echo "  workers      $(NSQJOBS_WORKERS), metrics on http://127.0.0.1:$(NSQJOBS_WORKER_PORT)/metrics to :$(LAST_WORKER_PORT)"
	@echo "  nsqd         tcp 127.0.0.1:$(NSQJOBS_NSQD_TCP_PORT), http 127.0.0.1:$(NSQJOBS_NSQD_HTTP_PORT), data $(DATA_DIR)/nsqd"
	@echo "  nsqlookupd   tcp 127.0.0.1:$(NSQJOBS_LOOKUPD_TCP_PORT), http 127.0.0.1:$(NSQJOBS_LOOKUPD_HTTP_PORT)"
	@echo "  nsqadmin     http://127.0.0.1:$(NSQJOBS_NSQADMIN_PORT)"
	@echo "  ledger       $(or $(NSQJOBS_LEDGER_URL),off)"
	@echo "  try:  curl -s -XPOST 'http://127.0.0.1:$(NSQJOBS_GATEWAY_PORT)/v1/jobs?wait=10' -H 'Content-Type: application/json' -d '{\"task\": \"primes.count\", \"args\": {\"start\": 0, \"stop\": 1000000}}'"
	@echo "  CLI:  .venv/bin/nsqjobs status ID  (the CLI and nsqjobs.Client read NSQJOBS_GATEWAY_URL=http://127.0.0.1:$(NSQJOBS_GATEWAY_PORT))"
	@echo "  status: make ctl (another terminal)"
	@echo "  stop: Ctrl-C (workers drain for $(NSQJOBS_GRACE_S)s at most)"
	@$(STACK_ENV) $(VENV)/bin/supervisord -c deploy/local/supervisord.conf & pid=$$!; \
	 trap 'kill -TERM $$pid 2>/dev/null' TERM INT HUP; \
	 wait $$pid; status=$$?; \
	 while kill -0 $$pid 2>/dev/null; do wait $$pid; status=$$?; done; \
	 wait $$pid; status=$$?; \
	 if [ -s $(DATA_DIR)/stack-failed ]; then \
		echo "make run: stopped: $$(cat $(DATA_DIR)/stack-failed)" >&2; exit 1; \
	 fi; exit $$status

# supervisorctl against the stack `make run` started: `make ctl`, `make ctl CMD="restart app:worker1"`.
CMD ?= status
ctl: venv
	@$(STACK_ENV) $(VENV)/bin/supervisorctl -c deploy/local/supervisord.conf $(CMD)

test: venv nsq
	PATH="$(BIN_DIR):$$PATH" $(VENV)/bin/python -m pytest

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict service workers tests bench

# The peers `python -m bench.peers` measures (the bench-peers extra): installed for `make bench`
# only. Their brokers, Redis and RabbitMQ, are Debian's (apt-get install redis-server
# rabbitmq-server); the benchmark starts its own on free ports, never the system services.
$(VENV)/.bench-peers: $(VENV)/.installed pyproject.toml
	$(VENV)/bin/pip install --quiet -e '.[dev,ladder,bench-peers]'
	@touch $@

bench: venv nsq $(VENV)/.bench-peers
	@command -v redis-server >/dev/null && [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || \
		echo "make bench: the peers need apt-get install redis-server rabbitmq-server" >&2
	PATH="$(BIN_DIR):$$PATH" $(VENV)/bin/python -m bench

# The chaos suite: every scenario at full size (a short version runs in make test).
# CHAOS_ARGS passes options on, e.g. CHAOS_ARGS="--only nsqd_kill --store postgres".
CHAOS_ARGS ?=
chaos: venv nsq
	PATH="$(BIN_DIR):$$PATH" $(VENV)/bin/python -m bench.chaos $(CHAOS_ARGS)

# Docker: the project image, the stand-ins for official images (no Docker Hub here), the tests.
images:
	docker compose build gateway

standins:
	deploy/standins/build.sh

compose-test: venv
	$(VENV)/bin/python -m pytest tests/test_compose.py -s

clean:
	rm -rf build *.egg-info workers/nsqjobs_tasks/kernels/*.c workers/nsqjobs_tasks/kernels/*.so .pytest_cache .mypy_cache .ruff_cache
