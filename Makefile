# The README's two commands: `make lab` (open the course) and `make test` (run every test).
.PHONY: setup lab test bench

setup:
	@bash scripts/setup.sh

lab: setup
	.venv/bin/jupyter lab notebooks/

test: setup
	@bash scripts/test.sh

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; .venv/bin/python $$b || exit 1; done
