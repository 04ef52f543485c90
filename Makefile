# The two commands of the README. Each runs the one-time set-up first (a no-op once done).
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	bash scripts/demo.sh

test: setup
	python3 -m pytest -q tests

bench: setup
	python3 benchmarks/attention.py --json benchmarks/results/attention_cpu.json
