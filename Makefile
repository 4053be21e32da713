# One command to install and start the studio, one to install and run the tests.
#   make studio            # installs into .venv, starts http://127.0.0.1:7860 (ARGS="--preset tiny")
#   make test              # installs (incl. Debian chromium for browser tests), runs pytest
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: studio test install install-dev chromium bench

$(VENV)/.runtime: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: $(VENV)/.runtime requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

studio: $(VENV)/.runtime
	$(PY) app.py $(ARGS)

test: $(VENV)/.dev chromium
	$(PY) -m pytest -n 2

bench: $(VENV)/.dev
	$(PY) bench/run.py --suite quick
