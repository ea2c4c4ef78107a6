# make test   -- create .venv if missing (torch CPU build first), run the test suite (slowest tests listed)
# make test-fast -- the same without the tests marked slow (trainings, real sweeps, compiles)
# make docs   -- same set-up, the documentation site (a page per method, from the registry) into site/
# make bench  -- same set-up, run the quick benchmark (under 5 minutes on 2 cores with 43 methods: the papers' claims,
#                then efficiency and tasks; see benchmarks/quick.toml) and write bench-results/report.md, report.html and plots
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# the pinned CPU build first: an unpinned torch would pull several GB of CUDA packages
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev,bench]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "not slow"

bench: $(STAMP)
	$(PY) -m attnzoo bench claims --quick --out bench-results
	$(PY) -m attnzoo bench all --quick --out bench-results

docs: $(STAMP)
	$(PY) -m attnzoo.docs build/docs-src
	cd build/docs-src && $(CURDIR)/$(VENV)/bin/mkdocs build --strict -d $(CURDIR)/site

clean:
	rm -rf $(VENV) bench-results .pytest_cache .hypothesis build site
