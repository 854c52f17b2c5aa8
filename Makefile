# prefect-branchkey: set-up, tests, demo and benchmarks.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
OFFICIAL := .venvs

.PHONY: setup official-clients system-deps broker test test-unit test-faults demo bench clean

# Root runs apt-get and the broker itself; anyone else through sudo.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests need: RabbitMQ (broker tests), Chromium (the dashboard's browser test).
DEBIAN_PACKAGES := rabbitmq-server chromium curl

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
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
broker: system-deps
	$(SUDO) service rabbitmq-server start >/dev/null 2>&1 || $(SUDO) rabbitmq-server -detached
	timeout 120 sh -c 'until $(SUDO) rabbitmqctl -q start_app >/dev/null 2>&1; do sleep 1; done'
	timeout 120 sh -c 'until $(SUDO) rabbitmqctl -q await_startup >/dev/null 2>&1; do sleep 1; done'
	$(SUDO) rabbitmq-plugins -q enable rabbitmq_management >/dev/null
	timeout 60 sh -c 'until curl -sf -u guest:guest http://127.0.0.1:15672/api/overview >/dev/null; do sleep 1; done'

# Everything the tests need (venvs, Debian packages, the broker), then the tests.
test: setup official-clients system-deps broker
	PREFECT_HOME=$$(mktemp -d) PREFECT_SERVER_ANALYTICS_ENABLED=false \
		$(BIN)/python -m pytest $(PYTEST_ARGS)

# The unit tier alone: pure rules in-process (no server process, broker or Prefect server), in seconds.
test-unit: setup
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# The fault suite alone: one fault at a time against a federation of real processes, with its summary table.
test-faults: setup system-deps broker
	PREFECT_HOME=$$(mktemp -d) PREFECT_SERVER_ANALYTICS_ENABLED=false \
		$(BIN)/python -m pytest -m fault $(PYTEST_ARGS)

# The demo federation: a local bk-server and Prefect server, three leaves, ten rounds (bk_dev/demo.py).
# DEMO_ARGS=--no-keep exits at the end instead of keeping the servers up for the UI.
demo: setup
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m prefect_branchkey.bk_dev.demo $(DEMO_ARGS)

bench: setup
	$(BIN)/python bench/aggregate.py

clean:
	rm -rf $(VENV) $(OFFICIAL) .pytest_cache demo-data
