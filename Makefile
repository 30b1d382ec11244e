# The two commands a new machine needs: `make demo` (segment a real image with the default
# model) and `make test` (the test suite). Everything else installs itself through `setup`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
REPO   ?= build/repository
DATA   ?= ../shared/data/dsb2018
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: setup export demo test test-fast bench-accuracy bench-cellseg1 bench-clicks bench bench-default gpu-wheels gpu-check clean

NODE_CLIENT := clients/node

setup: $(VENV)/.installed $(NODE_CLIENT)/node_modules/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) "numpy<2"
	$(BIN)/python -m pip install -q -e ".[export,server,dev,dask]"
	touch $@

# The Node.js client (README "From any language", tests/test_any_language.py): exactly the
# versions in its package-lock.json, no install scripts.
$(NODE_CLIENT)/node_modules/.installed: $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	@command -v npm >/dev/null || { echo "make setup: Node.js >= 18 with npm is needed for $(NODE_CLIENT) (the any-language test)"; exit 1; }
	cd $(NODE_CLIENT) && npm ci --ignore-scripts --no-audit --no-fund
	touch $@

WEIGHTS := export/weights/cellfinder_lite.pt export/weights/lite_decoder.pt export/weights/lite_decoder_roi.pt export/weights/lite_decoder_points.pt
# what an exported repository is made from besides the weights: a change re-exports
# (`<family>_labels` carries copies of the client's rule modules: export/labels_repository.py RULE_MODULES)
RULE_SOURCES := $(addprefix client/,api.py transport.py types.py images.py labels.py tiles.py resize.py autoscale.py \
  lite_rules.py cellsam_rules.py grid_rules.py points.py point_rules.py) cellsam_triton/errors.py
EXPORT_SOURCES := $(wildcard model_repository/*.py export/*.py export/models/*.py) cellsam_triton/contracts.py $(RULE_SOURCES)

$(REPO)/.exported: $(VENV)/.installed $(WEIGHTS) $(EXPORT_SOURCES)
	$(BIN)/cellsam-triton export --repository $(REPO) --target cpu
	sha256sum $(WEIGHTS) > $@

export: $(REPO)/.exported

demo: export
	$(BIN)/python -m cellsam_triton.demo --repository $(REPO) --data $(DATA) --out out/demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# ACCURACY_ARGS="--before DIR": also an earlier export on the same images (before/after in one run);
# "--tta 2 --tta 4": also the served model with test-time flips; "--grid 16,32" / "--grid none": grid rows
ACCURACY_ARGS ?=
bench-accuracy: export
	$(BIN)/python -m bench.accuracy --repository $(REPO) --data $(DATA) $(ACCURACY_ARGS)

# Speed of the default model: served roi vs served full vs the same steps on raw ONNX Runtime vs
# the classical baseline, one run on the val split (bench/speed_default.{json,md}).
BENCH_DEFAULT := build/bench-default
$(BENCH_DEFAULT)/%/.exported: $(VENV)/.installed $(WEIGHTS) $(EXPORT_SOURCES)
	$(BIN)/cellsam-triton export --repository $(BENCH_DEFAULT)/$* --decoder-context $* --target cpu
	sha256sum $(WEIGHTS) > $@

$(BENCH_DEFAULT)/roi_fp32/.exported: $(VENV)/.installed $(WEIGHTS) $(EXPORT_SOURCES)
	$(BIN)/cellsam-triton export --repository $(BENCH_DEFAULT)/roi_fp32 --encoder-precision fp32 --target cpu
	sha256sum $(WEIGHTS) > $@

BENCH_DEFAULT_ARGS ?=
bench-default: $(BENCH_DEFAULT)/roi/.exported $(BENCH_DEFAULT)/full/.exported $(BENCH_DEFAULT)/roi_fp32/.exported
	$(BIN)/python -m bench.speed_default --roi $(BENCH_DEFAULT)/roi --full $(BENCH_DEFAULT)/full \
	  --roi-fp32 $(BENCH_DEFAULT)/roi_fp32 --data $(DATA) $(BENCH_DEFAULT_ARGS)

# CellSeg1: default model vs grid prompts (the point decoder) without / after one-image fine-tuning
# (one row per training image kind: fluorescence, stained; each row's step count chosen among 30,45,60
# on 16 other train images of its kind), full val split (bench/cellseg1.md);
# CELLSEG1_ARGS="--limit N" for a shorter run, "--training-kinds stained" for one fine-tuned row,
# "--epochs 60" for one fixed step count, "--work bench/cellseg1_run" to reuse the committed adapters and scores.
CELLSEG1_ARGS ?=
bench-cellseg1: export
	$(BIN)/python -m bench.cellseg1 --repository $(REPO) --data $(DATA) $(CELLSEG1_ARGS)

# Ten clicks on ten nuclei (point prompts) with test-time flips 1 / 2 / 4, served, first 10 fluorescence and
# stained val images with ten clickable nuclei (bench/clicks.md); CLICKS_ARGS="--images-per-kind 3 --tta 1,4" for less.
CLICKS_ARGS ?=
bench-clicks: export
	$(BIN)/python -m bench.clicks --repository $(REPO) --data $(DATA) $(CLICKS_ARGS)

# Speed: served CellSAM vs in-process PyTorch vs raw ONNX Runtime, one run, bench/results.json + .png.
# The model is a random-weight ViT-B CellSAM in the official layout (same shapes, same cost).
BENCH_CKPT := build/bench/cellsam_vit_b_random.pt
bench: setup
	mkdir -p build/bench
	test -f $(BENCH_CKPT) || $(BIN)/python -c "from cellsam_triton.export.models.cellsam import make_random_checkpoint; make_random_checkpoint('$(BENCH_CKPT)', 'vit_b')"
	$(BIN)/python -m bench.serving --checkpoint $(BENCH_CKPT) --repository build/bench/repository --data $(DATA) --out bench

# GPU figures (issue 24, README "GPU figures"): `make gpu-wheels` here builds the one folder a device
# run carries (segment-anything + LiteMedSAM's code, its encoder weights, DSB val images; checked to
# fit the 64 MiB a device call takes with the working tree); `make gpu-check` there runs with the
# machine's own python3 and torch (no venv) and writes bench/gpu.json.
GPU_WHEELS ?= build/gpu-wheels
GPU_IMAGES ?= 0
GPU_OUT    ?= bench/gpu.json
GPU_PYTHON ?= python3
GPU_ARGS   ?=
gpu-wheels: $(VENV)/.installed
	$(BIN)/python -m bench.gpu_check --prepare $(GPU_WHEELS) --data $(DATA) --images $(GPU_IMAGES)

gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check --wheels $(GPU_WHEELS) --out $(GPU_OUT) $(GPU_ARGS)

clean:
	rm -rf build out .pytest_cache .hypothesis
