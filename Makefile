# tierlift — the two commands the README promises:
#   make run   set up a venv and train the tiny GPT on 2 CPU ranks through local Ray
#   make test  set up a venv and run the test suite (GPU-only tests are skipped without a GPU)
PY        ?= python3
VENV      ?= .venv
BIN       := $(VENV)/bin
# A CPU build of torch. On this workplace pip takes it from local disk; elsewhere PyPI.
TORCH     ?= torch==2.13.0
RUN_DIR   ?= runs/tiny-gpt-$(shell date +%Y%m%d-%H%M%S)
STEPS     ?= 300
STAMP     := $(VENV)/.tierlift-installed

# Debian packages the tests need besides Python ones: headless Chromium (tests/test_report.py
# opens the `tierlift report` page in it), the font its PNGs are drawn with, and Slurm with
# munge (tests/test_slurm_cluster.py starts a two-node cluster of real daemons on this machine).
TEST_DEBS := chromium fonts-dejavu-core slurm-wlm munge

.PHONY: setup run test test-deps test-gpu clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[ray,hf,test]"
	# DeepSpeed: the peer we measure against and the source of DeepSpeed-config truths in tests.
	# Its sdist imports torch at build time: build against the torch above, ops JIT-built only when used.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
	touch $(STAMP)

setup: $(STAMP)

# The main job: configs/tiny-gpt.yaml (2 ranks, Ray on 127.0.0.1, ZeRO-3, CPU), with the
# optimizer state (fp32 master + AdamW moments) on the NVMe tier in a temporary directory.
run: setup
	@NVME=$$(mktemp -d -t tierlift-nvme-XXXXXX); \
	$(BIN)/tierlift train configs/tiny-gpt.yaml --nproc 2 --backend ray --device cpu \
	    --steps $(STEPS) --run-dir $(RUN_DIR) \
	    --set "offload.optimizer={kind: nvme, path: $$NVME}"; rc=$$?; \
	rm -rf "$$NVME"; exit $$rc

# Installs TEST_DEBS once, only those missing (apt-get, as root or through sudo); quiet.
# Without dpkg (not Debian) it only checks that chromium is on PATH.
test-deps:
	@if command -v dpkg-query >/dev/null 2>&1; then \
	    missing=$$(for p in $(TEST_DEBS); do \
	        dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	else \
	    missing=$$(command -v chromium >/dev/null 2>&1 || echo chromium); \
	fi; \
	missing=$$(echo $$missing); \
	if [ -n "$$missing" ]; then \
	    if ! command -v apt-get >/dev/null 2>&1; then \
	        echo "make test: the tests need $$missing; install it (Debian: apt-get install $$missing) and rerun." >&2; \
	        exit 2; \
	    fi; \
	    sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    echo "make test: installing $$missing (apt-get)" >&2; \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    $$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: setup test-deps
	$(BIN)/python -m pytest -q -m "not gpu" --durations=15

# On a machine with CUDA: only the GPU tests.
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
