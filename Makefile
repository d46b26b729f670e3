# `make demo` and `make test` do all set-up: the virtualenv is (re)installed only when it is
# missing or requirements.txt / pyproject.toml changed since the last install.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SHAPES := data/shapes

NPROC ?= 2
RESTARTS ?= 0
CONFIG ?= configs/shapes_R18.yaml

.PHONY: install demo demo-ddp train-ddp soak test docs data clean

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

# Single-node multi-process training: one process per GPU (NCCL), or CPU processes (gloo).
# train.batch_size is per process: scale the LR with the total batch (see docs/multi-gpu.md).
# RESTARTS=N: when a rank dies, torchrun restarts the group up to N times, from the newest checkpoint.
train-ddp: $(STAMP)
	$(PY) -m torch.distributed.run --standalone --nproc_per_node=$(NPROC) --max-restarts=$(RESTARTS) tools/train.py --config $(CONFIG) $(ARGS)

demo-ddp: data
	$(MAKE) train-ddp NPROC=$(NPROC) CONFIG=configs/shapes_R18.yaml ARGS="output_dir=runs/shapes_R18_ddp train.batch_size=8 train.device=cpu $(ARGS)"

test: $(STAMP)
	$(PY) -m pytest -q

# Memory over a long run with data workers (minutes; not in `make test`): figures to docs/benchmarks/soak/shapes_R18.json
soak: data
	$(PY) scripts/soak.py $(ARGS)

# The documentation site (docs/, mkdocs.yml) into site/; strict: any warning (a broken link or
# anchor, a page missing from the nav) fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --site-dir site

clean:
	rm -rf runs site .pytest_cache
