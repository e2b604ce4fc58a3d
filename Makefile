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

.PHONY: setup run test test-gpu clean

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

test: setup
	$(BIN)/python -m pytest -q -m "not gpu" --durations=15

# On a machine with CUDA: only the GPU tests.
test-gpu: setup
	$(BIN)/python -m pytest -q -m gpu

clean:
	rm -rf $(VENV) runs .pytest_cache
