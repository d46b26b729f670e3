# `make demo` and `make test` do all set-up: the virtualenv is (re)installed only when it is
# missing or requirements.txt / pyproject.toml changed since the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHAPES := data/shapes

.PHONY: install demo test data clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

data: $(STAMP)
	$(PY) scripts/make_shapes.py --out $(SHAPES)

demo: data
	$(PY) tools/train.py --config configs/shapes_R18.yaml

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf runs .pytest_cache
