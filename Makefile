# mrl_jax: `make demo` trains the Fashion-MNIST MRL ViT; `make test` runs the tests.
# Both create (or refresh, when setup.py / constraints.txt change) the virtualenv.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdir/fashion_mnist_vit
CONFIG ?= configs/fashion_mnist_vit.py
# Where TFDS datasets live; empty = TFDS's default (~/tensorflow_datasets or $$TFDS_DATA_DIR).
DATA_DIR ?=
DATA_FLAG := $(if $(DATA_DIR),--data_dir=$(DATA_DIR),)
CONFIG_DATA_FLAG := $(if $(DATA_DIR),--config.dataset.data_dir=$(DATA_DIR),)
FMNIST_SRC := /usr/share/datasets/fashion-mnist
ARGS ?=

.PHONY: install data demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

# Debian's copy of Fashion-MNIST is the offline source when TFDS cannot download.
$(FMNIST_SRC):
	@if [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || \
	   (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)); \
	else \
	  echo "Fashion-MNIST source files missing: run 'sudo apt-get install dataset-fashion-mnist' (or let TFDS download)."; \
	fi

data: install $(FMNIST_SRC)
	$(PY) -m mrl_jax.data.prepare --dataset=fashion_mnist $(DATA_FLAG)

demo: data
	$(PY) -m mrl_jax.main --config=$(CONFIG) --workdir=$(WORKDIR) $(CONFIG_DATA_FLAG) $(ARGS)

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) workdir
