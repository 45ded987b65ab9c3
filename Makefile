# Two commands on a fresh machine: `make demo` and `make test`. Everything they need is
# installed from here (a .venv from pyproject.toml, and the Debian package mosquitto).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export NUMBA_CACHE_DIR ?= $(CURDIR)/.cache/numba

.PHONY: demo test lint bench bench-ingest chaos system-deps warm clean deb

$(VENV)/.stamp-run: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-run
	$(PY) -m pip install -q -e '.[test]'
	touch $@

system-deps:
	@bash packaging/ensure-system-deps.sh

warm: $(VENV)/.stamp-run
	$(VENV)/bin/fedsilo warm-cache

demo: $(VENV)/.stamp-run system-deps warm
	$(VENV)/bin/fedsilo demo --out demo-out
	$(VENV)/bin/fedsilo demo --imaging --out demo-out/imaging

deb:
	bash packaging/build-deb.sh dist

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .

test: $(VENV)/.stamp-test system-deps lint warm
	$(PY) -m pytest -q

# The slow chaos tier: the coordinator killed 40 times at random moments, and the crash tests.
chaos: $(VENV)/.stamp-test system-deps warm
	FEDSILO_CHAOS_KILLS=40 $(PY) -m pytest -q tests/test_chaos.py tests/test_crash_recovery.py

bench: $(VENV)/.stamp-test system-deps warm
	$(PY) benchmarks/bench_federation.py
	$(PY) benchmarks/bench_compression.py
	$(PY) benchmarks/bench_onnx.py
	$(VENV)/bin/fedsilo bench

bench-ingest: $(VENV)/.stamp-test warm
	$(PY) benchmarks/bench_ingest.py --repeats 7

clean:
	rm -rf $(VENV) .cache .pytest_cache demo-out
