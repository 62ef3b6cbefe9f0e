# The two quick-start commands: `make demo` (on-the-fly learning on ethanol, report in
# demo-run/) and `make test`. Both set up .venv first (idempotent).
PY := .venv/bin/python

.PHONY: setup setup-dev demo test bench clean

setup:
	bash scripts/setup.sh

setup-dev:
	bash scripts/setup.sh --dev

demo: setup
	$(PY) -m rarefly.cli demo

test: setup-dev
	$(PY) -m pytest -q -ra --durations=15

bench: setup-dev
	$(PY) benchmarks/bench_driver.py

clean:
	rm -rf .venv demo-run demo-run.previous
