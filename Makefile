# Ferry: the two commands of the README (demo, test) and the benchmark. Each installs what it needs.
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test lint unit bench clean

setup:
	@scripts/bootstrap.sh

demo: setup
	$(VENV)/bin/ferry demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/pytest -q tests

test: lint unit

bench: setup
	$(PY) -m bench.run $(if $(QUICK),--quick) $(if $(JSON),--json $(JSON)) $(BENCH_ARGS)

.PHONY: bench-imageio
bench-imageio: setup
	$(PY) -m bench.imageio_bench $(if $(SIZE),--size $(SIZE)) $(if $(JSON),--json $(JSON)) $(BENCH_ARGS)

clean:
	rm -rf build *.egg-info mover/_kernels*.so ext/*.c
