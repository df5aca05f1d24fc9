# wabridge — developer and operator entry points. See README.md.
VENV ?= /opt/wabridge-venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
export PYTHONPATH := $(CURDIR)

.PHONY: venv lint test test-fast bench chaos chaos-fleet mutate deb run lock clean

$(VENV)/.stamp: requirements.lock requirements-dev.lock
	# Debian's python3, in a world-readable place: DynamicUser workers must read the venv.
	/usr/bin/python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -r requirements.lock -r requirements-dev.lock
	chmod -R a+rX $(VENV)
	touch $@

venv: $(VENV)/.stamp

lint: venv
	$(VENV)/bin/ruff check wabridge agent controller sim tests bench packaging
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	# The binaries exist only once the package is installed; anything else fails the lint.
	@out=$$(systemd-analyze verify --man=no systemd/*.service systemd/*.slice 2>&1 | grep -v 'is not executable'); \
	  if [ -n "$$out" ]; then echo "$$out"; exit 1; else echo "systemd-analyze verify: clean"; fi

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: venv
	$(PY) -m pytest -m "not systemd and not slow" $(PYTEST_ARGS)

bench: venv
	$(PY) -m bench.run

chaos: venv
	$(PY) -m bench.chaos

# Host kills and freezes under load across a fleet of namespaces on one PostgreSQL
# (bench/chaos_fleet.py); JSON in bench/results/chaos-fleet-*.json
chaos-fleet: venv
	$(PY) -m bench.chaos_fleet

# Mutation testing of the pure decision modules against their fast tests (6 min on 2 cores);
# MODULES="agent/budget.py ..." for some of them. Report: bench/results/mutate-*.md and .json
mutate: venv
	$(PY) -m bench.mutate $(MODULES)

deb: venv
	packaging/build-deb

run: venv
	packaging/run-local

lock:
	rm -rf /tmp/wabridge-lock && /usr/bin/python3 -m venv /tmp/wabridge-lock
	/tmp/wabridge-lock/bin/pip install -q . && /tmp/wabridge-lock/bin/pip freeze --exclude wabridge > requirements.lock

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache
