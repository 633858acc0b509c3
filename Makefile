# One set-up for everything: `make setup` (idempotent), then demo / test / bench use .venv.
.PHONY: setup test demo bench gpu-check lint format clean

setup:
	@bash scripts/setup_env.sh

test: setup
	@bash scripts/run_tests.sh $(PYTEST_ARGS)

demo: setup
	@. .venv/bin/activate && python -m rnnpose_ros.tools.demo $(DEMO_ARGS)

bench: setup
	@. .venv/bin/activate && python -m rnnpose_ros.tools.bench $(BENCH_ARGS)

# CUDA parity, CUDA benchmark and the demo on CUDA, one table (< 8 min on a GPU machine).
gpu-check: setup
	@bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

lint: setup
	@.venv/bin/ruff check . && .venv/bin/ruff format --check .

format: setup
	@.venv/bin/ruff format . && .venv/bin/ruff check --fix .

clean:
	rm -rf build .pytest_cache .ruff_cache demo_output gpu_check_output
