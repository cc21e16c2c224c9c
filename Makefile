# Everything installs itself: `make test` and `make demo` create .venv and install the dependencies at
# the exact versions of constraints.txt (pyproject.toml declares ranges) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# the import-layer contract and the lint rules of pyproject.toml (a back-edge, a cycle, an undefined
# name or an unused import fails), then the tests
test: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check
	$(BIN)/python -m pytest tests

# Tiny teacher + tiny student on the 48 embedded CamVid frames; about 10 minutes on 2 CPU cores.
demo: $(STAMP)
	rm -rf runs/demo
	$(BIN)/dreamteacher train-teacher --data examples/camvid48 --out runs/demo/teacher --preset demo
	$(BIN)/dreamteacher sample runs/demo/teacher --out runs/demo/samples.png
	$(BIN)/dreamteacher pretrain --method dt-feat --teacher runs/demo/teacher --data examples/camvid48 \
		--out runs/demo/student --preset demo --probe-images examples/camvid48 \
		--probe-masks examples/camvid48-labels --probe-split examples/camvid48-probe-split.txt \
		--set probe.num_classes=11 --set probe.ignore_index=11
	$(BIN)/dreamteacher export runs/demo/student --out runs/demo/backbone.safetensors
	$(BIN)/dreamteacher report --teacher runs/demo/teacher --student runs/demo/student \
		--data examples/camvid48 --out runs/demo/report.html
	$(BIN)/dreamteacher viz --teacher runs/demo/teacher --student runs/demo/student \
		--data examples/camvid48 --out runs/demo/viz

clean:
	rm -rf runs .pytest_cache
