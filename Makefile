# Everything sets itself up: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

DEMO   ?= demo
DEMO_EPOCHS ?= 8

.PHONY: demo test test-gpu install clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,dist]'
	touch $(STAMP)

install: $(STAMP)

# The built-in synthetic set (10 classes of shapes and textures, 6000 + 1200 images at 36x36), alexnet-small
# trained on it for DEMO_EPOCHS epochs (about 30 s each on a quiet 2-core CPU), evaluated, and drawn as PNGs.
demo: $(STAMP)
	test -f $(DEMO)/data/val.h5 || $(PY) -m cpnet prep synthetic --out $(DEMO)/data --overwrite
	rm -rf $(DEMO)/run
	$(PY) -m cpnet train --data $(DEMO)/data --model alexnet-small --epochs $(DEMO_EPOCHS) --batch-size 32 \
		--lr 0.02 --out $(DEMO)/run
	$(PY) -m cpnet eval $(DEMO)/run/best.h5 --data $(DEMO)/data/val.h5
	$(PY) -m cpnet eval $(DEMO)/run/best.h5 --data $(DEMO)/data/val.h5 --ten-crop
	$(PY) -m cpnet show curves $(DEMO)/run -o $(DEMO)/curves.png
	$(PY) -m cpnet show predictions $(DEMO)/run/best.h5 --data $(DEMO)/data/val.h5 -o $(DEMO)/predictions.png
	$(PY) -m cpnet show filters $(DEMO)/run/best.h5 -o $(DEMO)/conv1.png

test: $(STAMP)
	$(PY) -m pytest -q tests

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu tests

clean:
	rm -rf $(VENV) build *.egg-info $(DEMO)
