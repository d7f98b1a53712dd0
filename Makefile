# The two commands a user runs first: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000

.PHONY: install test demo loadtest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when the project's metadata changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Two workers by default (pytest-xdist; whole files per worker so module fixtures are built once).
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

demo: install
	$(BIN)/din demo --port $(PORT)

# Load test: starts the local service (unless HOST is given), runs locust headless,
# writes reports/loadtest/ and exits non-zero when the thresholds are broken.
#   make loadtest HOST=http://10.0.0.5:8000 LOADTEST_ARGS="--duration 120 --users 20"
# HOST counts only on make's command line: a HOST in the environment is din serve's bind
# address (e.g. 0.0.0.0), not a service to load-test.
LOADTEST_ARGS ?=
LOADTEST_HOST := $(if $(filter command line,$(origin HOST)),$(HOST))
loadtest: install
	$(BIN)/din loadtest $(if $(LOADTEST_HOST),--host $(LOADTEST_HOST)) $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .din artifacts reports
