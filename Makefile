# InferGrid front door. Targets wrap the scripts in tools/, stack/ and Bazel; they do not duplicate them.
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
# The import roots outside Bazel: the repository (libs, services, stack) and the generated code.
export PYTHONPATH := $(CURDIR):$(CURDIR)/build/gen
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
BAZEL ?= bazel
BAZEL_FLAGS ?=

.PHONY: help setup gen test test-py test-bazel lint fmt clean

help:  ## list targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

setup:  ## install system packages, the pinned virtualenv and generated code (idempotent)
	@tools/setup.sh

gen: setup  ## regenerate protobuf/gRPC code into build/gen
	@$(PY) protos/generate.py --out build/gen

test: setup  ## run every test: pytest (unit + real servers) and bazel test //...
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-bazel

test-py: setup  ## pytest only
	$(PY) -m pytest $(PYTEST_ARGS)

test-bazel: setup  ## bazel test //... (offline)
	$(BAZEL) test $(BAZEL_FLAGS) //...

lint: setup  ## ruff + mypy
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: setup  ## ruff format + autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:  ## remove generated code and Bazel outputs (keeps the virtualenv and stack state)
	rm -rf build
	-$(BAZEL) clean 2>/dev/null

# Local stack (stack/): real Redis, Cassandra, Kafka, Jaeger and Envoy on loopback; state in .state/.
# Name components to act on some only, e.g. `make up COMPONENTS="redis kafka"`.
# PROFILE=cluster: 3 Cassandra nodes, 3 Kafka brokers, Redis + replica, 2 replicas of each service and a
# supervisor; state in .state/cluster/ (see the README's "Cluster profile").
PROFILE ?= $(or $(INFERGRID_STACK_PROFILE),single)
STACK := $(PY) -m stack --profile $(PROFILE)
.PHONY: up down status logs clean-state

up: setup  ## install what is missing, start the local stack, wait until it answers (PROFILE=cluster: the cluster)
	$(STACK) up $(COMPONENTS)

down: setup  ## stop the local stack (TERM, then KILL after a timeout)
	$(STACK) down $(COMPONENTS)

status: setup  ## one table: component, pid, port, health, uptime
	@$(STACK) status $(COMPONENTS)

logs: setup  ## the last lines of each server's log
	@$(STACK) logs $(COMPONENTS)

clean-state: setup  ## stop the stack and delete its data and logs (keeps the install cache)
	$(STACK) clean-state $(COMPONENTS)

# Chaos (chaos/): faults under load against the cluster profile, every answered request reconciled with the
# sinks. Results in chaos/results/<timestamp>/ and chaos/results/latest/; `make test` runs the short suite.
.PHONY: chaos chaos-quick

chaos: setup  ## every fault scenario against the cluster profile (started unless running; about 20 min); CHAOS_ARGS="--only redis-restart"
	$(PY) -m chaos $(CHAOS_ARGS)

chaos-quick: setup  ## the short suite (a few scenarios, shorter faults)
	$(PY) -m chaos --quick $(CHAOS_ARGS)

# Benchmarks (bench/): never part of `make test`. Results in bench/results/<timestamp>/ and bench/results/latest/.
.PHONY: bench bench-quick

bench: setup  ## every benchmark, side by side with the peers (about 30 min on 2 cores); BENCH_ARGS="--only inference"
	$(PY) -m bench run $(BENCH_ARGS)

bench-quick: setup  ## the same benchmarks with fewer points and one short repetition (a few minutes)
	$(PY) -m bench run --quick $(BENCH_ARGS)
