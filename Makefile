# The two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
OUT ?= runs/demo

.PHONY: install demo test test-all lint bench clean

# Debian's Chromium renders the report in the browser test, so only the test targets
# install it (as root, as CI runs; SUDO=sudo otherwise).
SUDO ?=
CHROMIUM := /usr/bin/chromium

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install --no-compile -c constraints.txt -e '.[dev,zoo,peft]'
	# Byte-compiled on both cores (pip compiles on one); torch ships files only newer
	# Pythons parse (py312_*), which pip skips as well.
	$(BIN)/python -m compileall -q -j 0 -x 'py3[1-9][0-9]_' $(VENV)/lib > /dev/null
	touch $(STAMP)

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/robust-transfer demo --out $(OUT)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks examples docs/hooks.py
	$(BIN)/ruff format --check src tests benchmarks examples docs/hooks.py
	$(BIN)/mypy

# One worker per core; a test file stays on one worker, so its fixtures are built once.
# CI runs `make test`: all but the slow tier (pyproject.toml), within 15 minutes on 2
# cores; `make test-all` adds the slow tier (about 7 minutes more).
test: lint | $(CHROMIUM)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

test-all: lint | $(CHROMIUM)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# About four hours on 2 cores: every benchmark, then benchmarks/RESULTS.md, whose figures
# the README quotes.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_attack.py --resnet-batch 16 --repeats 7
	$(BIN)/python benchmarks/bench_tail.py --encoders standard,adversarial,simclr
	$(BIN)/python benchmarks/bench_expected.py --encoders simclr --points 200 --aa-heads 1 --aa-points 50
	$(BIN)/python benchmarks/bench_certify.py
	$(BIN)/python benchmarks/bench_certify.py --points 20 --methods lipschitz,ibp,crown,crown-full --threats Linf:1/40 --out benchmarks/results/bench_certify_full
	$(BIN)/python benchmarks/bench_adapt.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_scale.py --encoder wide_resnet:wrn_16_4_grey --classes 2 --steps 2 --representation pgd --restarts 1 --no-unsharded --torchrun-points 0 --out benchmarks/results/bench_scale_wrn16
	$(BIN)/python benchmarks/bench_scale.py --encoder wide_resnet:wrn_16_4_grey --classes 2 --steps 2 --representation pgd --restarts 1 --sizes 1000 --write-study runs/bench-wrn16-1000
	PYTHONPATH=benchmarks $(BIN)/python benchmarks/bench_plan.py --name wrn16_1000 run -- runs/bench-wrn16-1000/scale.toml
	$(BIN)/python benchmarks/bench_profile.py
	$(BIN)/python benchmarks/bench_plan.py demo
	$(BIN)/python benchmarks/bench_plan.py --name resnet50 transfer -- --encoder torchvision:resnet50 --resize --data task:mnist-5-9 --n 100 --train-points 200 --steps 5 --restarts 1 --representation pgd --linf 4/255 --l2
	$(BIN)/python benchmarks/bench_big.py
	$(BIN)/python benchmarks/collect.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
