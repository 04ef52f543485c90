# The two commands of the README. Each runs the one-time set-up first (a no-op once done).
.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	moca3d bench-attention --n 4 8 16 32 --L 256 --dim 512 --heads 8 --repeats 3 --json benchmarks/results/attention_cpu.json

test: setup
	python3 -m pytest -q tests

bench: setup
	python3 benchmarks/attention.py --json benchmarks/results/attention_cpu.json
