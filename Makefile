# The two commands of the README: `make run` and `make test` (as root on Debian/Ubuntu).
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test lint deps test-deps bench-deps bench bench-overhead bench-scrape bench-throttling bench-storm bench-network bench-locks bench-seed bench-guest bench-seed-guest clean

deps:
	@bash scripts/bootstrap.sh run

test-deps:
	@bash scripts/bootstrap.sh test

bench-deps:
	@bash scripts/bootstrap.sh bench

run: deps
	$(VENV)/bin/nodetune run $(ARGS)

lint: test-deps
	$(VENV)/bin/ruff check agent probes tests bench
	$(VENV)/bin/ruff format --check agent probes tests bench

test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

bench: bench-overhead bench-scrape bench-throttling bench-storm bench-network bench-locks bench-seed

bench-overhead: bench-deps
	$(VENV)/bin/python bench/runqlat_overhead.py $(ARGS)

bench-scrape: bench-deps
	$(VENV)/bin/python bench/scrape_cost.py $(SCRAPE_ARGS)

bench-throttling: bench-deps
	$(VENV)/bin/python bench/throttling_cost.py $(THROTTLING_ARGS)

bench-storm: bench-deps
	$(VENV)/bin/python bench/api_storm.py $(STORM_ARGS)

bench-network: bench-deps
	$(VENV)/bin/python bench/network_cost.py $(NETWORK_ARGS)
	$(VENV)/bin/python bench/network_cost.py --churn $(NETWORK_ARGS)
	$(VENV)/bin/python bench/network_cost.py --churn --child-ehash 1024 $(NETWORK_ARGS)

bench-locks: bench-deps
	$(VENV)/bin/python bench/lock_connect_overhead.py $(LOCK_ARGS)

# Seed 000 reproduced: a proxy's workers connecting to one upstream, in an empty and a crowded port range.
bench-seed: bench-deps
	$(VENV)/bin/python bench/seed_000.py $(SEED_ARGS)

# The connect strategies this kernel refuses (fexit, kprobe), costed in the stock-kernel guest
# with an instruction-counting clock (tests/kernel_vm.py, accelerator "icount"). Not in `bench`:
# about 6 minutes of emulation.
GUEST_LOCK_ARGS ?= --rounds 4 --connects 2000
bench-guest: bench-deps test-deps
	$(VENV)/bin/python -m tests.kernel_vm --accel=icount -- $(VENV)/bin/python bench/lock_connect_overhead.py --only connect $(GUEST_LOCK_ARGS)

# Seed 000 on Debian's 6.1 kernel (before 6.15's lockless port search) with bare-metal spinlocks, 4
# emulated CPUs: where the port search spins. Not in `bench`: about 5 minutes of emulation.
GUEST_SEED_ARGS ?= --rounds 2
bench-seed-guest: bench-deps test-deps
	$(VENV)/bin/python -m tests.kernel_vm --accel=tcg-native --cpus=4 -- $(VENV)/bin/python bench/seed_000.py $(GUEST_SEED_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
