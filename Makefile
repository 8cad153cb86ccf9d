# Two commands on a fresh machine: `make run` and `make test`.
# Both create .venv in the checkout and install the appliance into it (editable,
# which compiles the Cython core), then run. Re-running reinstalls only when the
# packaging files or native sources changed.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SRC    := pyproject.toml setup.py $(wildcard native/*.pyx)

.PHONY: run test install bench loadtest clean

# Secure by default at no cost: a fresh checkout gets a .env with generated secrets.
# RAG_SAMPLE: 200 ICD-10-CM codes are indexed at first start, so search answers at once.
run: $(VENV)/.installed
	@test -f "$${APPLIANCE_HOME:-.}/.env" || $(BIN)/appliance init
	RAG_SAMPLE=$${RAG_SAMPLE-icd10cm} $(BIN)/appliance up

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest

install: $(VENV)/.installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python $(SRC)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/bin/python $(SRC)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.installed

# Benchmarks (not part of the tests): Celery + Redis are the baseline of part 3.
bench: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
	$(BIN)/python loadtest/bench_broker.py

# The operators' load test against a running appliance (README "Load test"):
#   make loadtest URL=http://127.0.0.1:8000 TOKEN=... [USERS=20 SECONDS=60 PACE=0 REPORT=file]
# (@: the command line holds the token; make must not echo it)
loadtest: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[load]'
	@$(BIN)/python loadtest/run.py --url "$(URL)" --token "$(TOKEN)" --users $(or $(USERS),20) \
	  --seconds $(or $(SECONDS),60) --pace $(or $(PACE),0) $(if $(REPORT),--report "$(REPORT)")

clean:
	rm -rf $(VENV) build *.egg-info native/*.c appliance/broker/_pqueue*.so appliance/_shm*.so
