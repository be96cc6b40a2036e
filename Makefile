# Two commands on a fresh machine: `make run` (default simulation) and `make test` (test suite).
# Both create the virtual environment on first use. Pass Hydra overrides with ARGS="...".
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.snowfed-installed

.PHONY: setup run smoke test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# The CPU build of torch first (an unpinned torch would pull a multi-GB CUDA build);
	@# a torch already present (e.g. a GPU user's own build) is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/snowfed run $(ARGS)

smoke: setup
	$(VENV)/bin/snowfed run federation=smoke $(ARGS)

# pytest exits 5 when it collected no test: that is a broken suite, not a pass.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
