# prefect-branchkey: set-up, tests, demo and benchmarks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OFFICIAL := .venvs
# The Prefect versions `make test` exercises: the suite runs on the latest, the unit tier and one
# real federation on the lowest supported (pyproject.toml: prefect>=3.8.8,<4).
PREFECT_LATEST := 3.9.1
PREFECT_LOWEST := 3.8
# Other Pythons the unit tier runs on (pyenv's, as this machine has them; requires-python >=3.11,<3.14).
OTHER_PYTHONS := 3.12 3.13
python_of = $(firstword $(wildcard $(HOME)/.pyenv/versions/$(1)*/bin/python$(1)) $(shell command -v python$(1)))

.PHONY: setup official-clients system-deps broker lint test test-fast test-unit test-compat test-faults demo bench clean

# Root runs apt-get and the broker itself; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests need: RabbitMQ (broker tests), Chromium (the dashboard's browser test).
DEBIAN_PACKAGES := rabbitmq-server chromium curl

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' 'prefect==$(PREFECT_LATEST)'
	touch $@

# The lowest supported Prefect in a venv of its own, with the caps its server needs.
$(OFFICIAL)/prefect-lowest/.installed: pyproject.toml constraints/prefect-$(PREFECT_LOWEST).txt
	$(PYTHON) -m venv $(OFFICIAL)/prefect-lowest
	$(OFFICIAL)/prefect-lowest/bin/pip install --quiet -e '.[test]' -c constraints/prefect-$(PREFECT_LOWEST).txt
	touch $@

# Each other Python: the base with the dev and mlflow extras and pytest (torch's CPU build here is for 3.11 only).
$(OFFICIAL)/python-%/.installed: pyproject.toml
	@test -n "$(call python_of,$*)" || { echo "Python $* is not installed (pyenv install $*)"; exit 1; }
	$(call python_of,$*) -m venv $(OFFICIAL)/python-$*
	$(OFFICIAL)/python-$*/bin/pip install --quiet -e '.[dev,mlflow]' 'pytest>=8,<9.2' 'pytest-xdist>=3.6' 'pyyaml>=6'
	touch $@

# The official branchkey clients, each in its own venv (they pin requests/numpy of their own).
# 2.7.1 is the release the protocol document describes (AMQP on 5672); later 2.7.x default
# to AMQPS on 5671 and need rbmq_port=5672, rbmq_ssl=False against a local broker.
OFFICIAL_2 := 2.7.1
OFFICIAL_3 := 3.0.1
official-clients: $(OFFICIAL)/branchkey-2.7/.installed $(OFFICIAL)/branchkey-3.0/.installed

$(OFFICIAL)/branchkey-2.7/.installed:
	$(PYTHON) -m venv $(OFFICIAL)/branchkey-2.7
	$(OFFICIAL)/branchkey-2.7/bin/pip install --quiet 'branchkey==$(OFFICIAL_2)'
	touch $@

$(OFFICIAL)/branchkey-3.0/.installed:
	$(PYTHON) -m venv $(OFFICIAL)/branchkey-3.0
	$(OFFICIAL)/branchkey-3.0/bin/pip install --quiet 'branchkey==$(OFFICIAL_3)'
	touch $@

system-deps:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# RabbitMQ with its management plugin, on 127.0.0.1 (Debian's rabbitmq-server).
# A broker that already answers (started by the init system or by hand) is used as it is: Debian's
# init script waits up to 10 minutes for a pid file that a broker started by hand never writes.
# A broker whose management API already answers needs nothing more (each rabbitmqctl call boots an
# Erlang VM: seconds).
BROKER_API := http://127.0.0.1:15672/api/overview
broker: system-deps
	@if curl -sf -u guest:guest $(BROKER_API) >/dev/null 2>&1; then echo "RabbitMQ answers on 127.0.0.1"; else \
	if timeout 20 $(SUDO) rabbitmqctl -q status >/dev/null 2>&1; then echo "RabbitMQ is already running"; \
	else timeout 120 $(SUDO) service rabbitmq-server start >/dev/null 2>&1 || $(SUDO) rabbitmq-server -detached; fi; \
	timeout 120 sh -c 'until $(SUDO) rabbitmqctl -q start_app >/dev/null 2>&1; do sleep 1; done' && \
	timeout 120 sh -c 'until $(SUDO) rabbitmqctl -q await_startup >/dev/null 2>&1; do sleep 1; done' && \
	$(SUDO) rabbitmq-plugins -q enable rabbitmq_management >/dev/null && \
	timeout 60 sh -c 'until curl -sf -u guest:guest $(BROKER_API) >/dev/null; do sleep 1; done'; fi

# The tests run in TEST_WORKERS processes (pytest-xdist; 0 is one process). Tests sharing a
# module-scoped fixture stay on one worker (tests/support/worker_groups.py); the tests marked
# `exclusive` (they restart the broker every other test uses) run afterwards, alone, collected
# from their own files only. The whole suite is mostly CPU-bound on two cores (the e2e tier's
# servers and leaves), so two workers: more only add load. The unit and integration tiers alone
# mostly wait (on round deadlines, uploads and servers: 60% of two cores busy with three workers,
# 71% with four), so `make test-fast` runs FAST_TEST_WORKERS. The 20 slowest durations are printed
# for tracking where the time goes.
TEST_WORKERS ?= 2
FAST_TEST_WORKERS ?= 4
PYTEST := PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest
EXCLUSIVE_TESTS := $(shell grep -rl --include='test_*.py' 'pytest.mark.exclusive' tests)
# Paths in PYTEST_ARGS narrow the exclusive step as they narrow the parallel run.
PYTEST_ARGS_PATHS = $(filter tests tests/%,$(PYTEST_ARGS))
# $(call pytest_in_parallel,MARKER EXPRESSION,PATHS,WORKERS,EXCLUSIVE TEST FILES): the parallel run
# of PATHS (every test when empty), then the exclusive tests of those files, or of PYTEST_ARGS's
# paths when it names some (pytest's exit 5, none selected, is no failure; with neither, no step).
# PYTEST_ARGS goes to both.
define pytest_in_parallel
	PREFECT_HOME=$$(mktemp -d) $(PYTEST) -n $(3) --dist loadgroup --durations=20 \
		-m "$(if $(1),($(1)) and )not exclusive" $(2) $(PYTEST_ARGS)
	$(if $(or $(PYTEST_ARGS_PATHS),$(4)),PREFECT_HOME=$$(mktemp -d) $(PYTEST) -m "$(if $(1),($(1)) and )exclusive" \
		$(if $(PYTEST_ARGS_PATHS),,$(4)) $(PYTEST_ARGS) || [ $$? = 5 ])
endef

# Everything the tests need (venvs, Debian packages, the broker), the lint, the tests, then the
# lowest Prefect and the other Pythons.
test: setup official-clients system-deps broker lint
	$(call pytest_in_parallel,,,$(TEST_WORKERS),$(EXCLUSIVE_TESTS))
	$(MAKE) test-compat

# ruff (lint and import order) and mypy, as configured in pyproject.toml. mypy reads the
# namespace through links (build/typecheck/prefect_branchkey/<folder>), as the wheel lays it out.
NAMESPACE_FOLDERS := bk_blocks tasks flows deployments bk_server bk_dev
lint: setup
	$(BIN)/ruff check .
	rm -rf build/typecheck && mkdir -p build/typecheck/prefect_branchkey
	cp prefect_branchkey/__init__.py prefect_branchkey/py.typed build/typecheck/prefect_branchkey/
	for folder in $(NAMESPACE_FOLDERS); do ln -s ../../../$$folder build/typecheck/prefect_branchkey/$$folder; done
	$(BIN)/mypy

# The unit tier and one real federation (WebSocket notifications: the transport is ours, not
# Prefect's) on the lowest supported Prefect; the unit tier on each other Python.
test-compat: $(OFFICIAL)/prefect-lowest/.installed $(foreach v,$(OTHER_PYTHONS),$(OFFICIAL)/python-$(v)/.installed)
	PREFECT_HOME=$$(mktemp -d) PREFECT_SERVER_ANALYTICS_ENABLED=false $(OFFICIAL)/prefect-lowest/bin/python \
		-m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup tests/unit tests/integration/test_flows_federation.py \
		-k "not (test_flows_federation and amqp)"
	@for v in $(OTHER_PYTHONS); do \
		echo "unit tier on Python $$v"; \
		PREFECT_HOME=$$(mktemp -d) $(OFFICIAL)/python-$$v/bin/python -m pytest -q -p no:cacheprovider \
			-n $(TEST_WORKERS) tests/unit || exit 1; \
	done

# The inner loop: the unit and integration tiers (real bk-server, broker and Prefect server; no e2e).
test-fast: setup official-clients system-deps broker
	$(call pytest_in_parallel,,tests/unit tests/integration,$(FAST_TEST_WORKERS),$(filter tests/unit/% tests/integration/%,$(EXCLUSIVE_TESTS)))

# The unit tier alone: pure rules in-process (no server process, broker or Prefect server), in seconds.
test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The fault suite alone: one fault at a time against a federation of real processes, with its summary table.
test-faults: setup system-deps broker
	$(call pytest_in_parallel,fault,,$(TEST_WORKERS),$(filter tests/e2e/faults/%,$(EXCLUSIVE_TESTS)))

# The demo federation: a local bk-server and Prefect server, three leaves, ten rounds (bk_dev/demo.py).
# DEMO_ARGS=--no-keep exits at the end instead of keeping the servers up for the UI.
demo: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m prefect_branchkey.bk_dev.demo $(DEMO_ARGS)

bench: setup
	$(BIN)/python bench/aggregate.py

clean:
	rm -rf $(VENV) $(OFFICIAL) .pytest_cache demo-data
