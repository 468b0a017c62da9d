# streamrec: the local stack and the test suite.
#
#   make test    virtualenv + project, Kafka jars, Redis, then pytest (integration tests start
#                their own broker and server on free ports). PYTEST_ARGS='...' passes options.
#   make up      start the local Kafka broker and Redis server; prints the environment to use:
#                  eval "$(make -s up)"
#   make down    stop them (data stays in .run/; running either twice is harmless)
#   make demo    the end-to-end demo
#   make lint    ruff
#
# Needs Python 3.11, Java 17+ and Maven 3.8+; Redis is installed with apt-get when missing.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV ?= .venv
KAFKA_PORT ?= 9092
KAFKA_CONTROLLER_PORT ?= $(shell echo $$(( $(KAFKA_PORT) + 1 )))
REDIS_PORT ?= 6379
PYTEST_ARGS ?=

KAFKA := deploy/kafka/kafka.sh
REDIS := deploy/redis/redis.sh
VENV_STAMP := $(VENV)/.streamrec-installed
# what `make venv` takes on disk at most: 6.5 GB installed, 11 GB at its peak while the downloaded wheels unpack (measured)
VENV_NEEDS_MIB := 11264

.PHONY: help venv up down status test demo lint kafka-jars redis-server deploy-tools

help:
	@sed -n '2,/^$$/p' Makefile | sed 's/^# \{0,1\}//'

# --------------------------------------------------------------------------- environment

venv: $(VENV_STAMP)

# Re-installs only when pyproject.toml or this file changes (or the stamp is missing).
# Everything: the worker, the train extra (torch) and the gpu extra (CUDA libraries for
# tests/gpu), and the test tools.
$(VENV_STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null 2>&1 || { \
	  echo "make venv: $(PYTHON) not found: install Python 3.11 (Debian 12: apt-get install python3.11 python3.11-venv)" >&2; exit 1; }
	@if [ ! -x $(VENV)/bin/python ]; then \
	  if ! $(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1; then \
	    if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      echo "make venv: installing python3.11-venv with apt-get"; \
	      { apt-get install -y -q python3.11-venv >/dev/null 2>&1 || \
	        { apt-get update -q >/dev/null && apt-get install -y -q python3.11-venv >/dev/null; }; } || { \
	        echo "make venv: apt-get install python3.11-venv failed" >&2; exit 1; }; \
	    else \
	      echo "make venv: $(PYTHON) lacks the venv module: apt-get install python3.11-venv" >&2; exit 1; \
	    fi; \
	  fi; \
	  echo "make venv: creating $(VENV) with $(PYTHON)"; \
	  $(PYTHON) -m venv $(VENV); \
	fi
	@echo "$(VENV)/bin/python -m pip install -q --no-cache-dir -e '.[dev,train,gpu]'"
	@$(VENV)/bin/python -m pip install -q --no-cache-dir -e '.[dev,train,gpu]' || { rc=$$?; \
	  for dir in $(VENV) "$${TMPDIR:-/tmp}"; do \
	    free_mib=$$(df -Pk "$$dir" 2>/dev/null | awk 'NR == 2 {print int($$4 / 1024)}'); \
	    if [ -n "$$free_mib" ] && [ "$$free_mib" -lt $(VENV_NEEDS_MIB) ]; then \
	      echo "make venv: only $$free_mib MiB free where $$dir is; the install needs about $(VENV_NEEDS_MIB) MiB (torch and its CUDA libraries, and the downloads while they unpack): free some space, or set TMPDIR to a larger disk, and run it again" >&2; \
	    fi; \
	  done; exit $$rc; }
	@touch $@

kafka-jars:
	@$(KAFKA) fetch

redis-server:
	@$(REDIS) install

# promtool (Debian's prometheus) and the manifest/compose schema checkers, for the deploy tests
deploy-tools:
	@bash deploy/tools.sh

# --------------------------------------------------------------------------- local stack

# Progress goes to stderr, so that stdout is only the two export lines.
up:
	@$(KAFKA) --port $(KAFKA_PORT) --controller-port $(KAFKA_CONTROLLER_PORT) start >&2
	@$(REDIS) --port $(REDIS_PORT) start >&2
	@echo "export STREAMREC_KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT)"
	@echo "export STREAMREC_REDIS_URL=redis://127.0.0.1:$(REDIS_PORT)/0"

down:
	@rc=0; $(KAFKA) stop || rc=1; $(REDIS) stop || rc=1; exit $$rc

status:
	@rc=0; $(KAFKA) status || rc=1; $(REDIS) status || rc=1; exit $$rc

# --------------------------------------------------------------------------- checks

test: venv kafka-jars redis-server deploy-tools
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

# --------------------------------------------------------------------------- demo

# Starts the stack, runs the pipeline end to end (stream/demo.py), stops the stack again,
# also when the demo fails. DEMO_ARGS='--dataset PATH --format taobao --events 50000' etc.
DEMO_ARGS ?=
demo: venv kafka-jars redis-server
	@eval "$$($(MAKE) -s up)" && export STREAMREC_KAFKA_BOOTSTRAP STREAMREC_REDIS_URL && \
	  $(VENV)/bin/python -m stream.demo $(DEMO_ARGS); rc=$$?; $(MAKE) -s down; exit $$rc
