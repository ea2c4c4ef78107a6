# make test   -- create .venv if missing (torch CPU build first), run the test suite
# make bench  -- same set-up, run the default CPU benchmark (under 3 minutes on 2 cores)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test bench readme clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	# the pinned CPU build first: an unpinned torch would pull several GB of CUDA packages
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

bench: $(STAMP)
	$(PY) -m attnzoo bench --lengths 2048 --repeats 2 --out bench-results/bench.jsonl

readme: $(STAMP)
	$(PY) -m attnzoo.readme

clean:
	rm -rf $(VENV) bench-results .pytest_cache .hypothesis
