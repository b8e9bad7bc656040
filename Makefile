# mrl_jax: `make demo` trains the Fashion-MNIST MRL ViT; `make demo_align` the MRL
# dual encoder on Fashion-MNIST captions (`make demo_align_ff`: its fixed-feature
# baseline); `make test` runs the tests.
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

.PHONY: install data data_align demo demo_align demo_align_ff reproduce test clean

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

# Image-caption pairs written from the class names (mrl_jax/data/captions.py).
data_align: data
	$(PY) -m mrl_jax.data.prepare --dataset=fashion_mnist_captions $(DATA_FLAG)

ALIGN_WORKDIR ?= workdir/fashion_mnist_align
demo_align: data_align
	$(PY) -m mrl_jax.main --config=configs/fashion_mnist_align.py --workdir=$(ALIGN_WORKDIR) $(CONFIG_DATA_FLAG) $(ARGS)

demo_align_ff: data_align
	$(PY) -m mrl_jax.main --config=configs/fashion_mnist_align.py:ff --workdir=$(ALIGN_WORKDIR)_ff $(CONFIG_DATA_FLAG) $(ARGS)

# The paper's comparisons (MRL, MRL-E, FF at every dim, SVD, random features,
# adaptive classification, funnel retrieval) on $(CONFIG); see docs/results/.
REPRO_WORKDIR ?= workdir/reproduce
reproduce: data
	$(PY) -m mrl_jax.reproduce --config=$(CONFIG) --workdir=$(REPRO_WORKDIR) $(CONFIG_DATA_FLAG) $(ARGS)

test: install
	$(PY) -m pytest -q -n auto --dist loadfile tests

clean:
	rm -rf $(VENV) workdir
