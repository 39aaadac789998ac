# The two README commands: `make demo` and `make test`. Both set up what they need first (idempotent).
.PHONY: setup demo test test-unit bench lint idle-kernel

setup:
	scripts/setup.sh

demo: setup
	.venv/bin/vmsight demo

test: setup
	scripts/test.sh

test-unit:
	.venv/bin/pytest -q tests/unit

bench: setup
	.venv/bin/python -m benchmarks

lint:
	scripts/setup.sh --no-kernels
	.venv/bin/ruff check src tests benchmarks
	.venv/bin/mypy

idle-kernel:
	guest/build-idle-kernel.sh
