# The two commands of the README: `make run` and `make test` (as root on Debian/Ubuntu).
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: run test lint deps test-deps bench-deps bench bench-overhead bench-scrape bench-throttling bench-storm bench-network bench-locks bench-seed bench-guest bench-seed-guest bench-soak bench-footprint image e2e e2e-deps clean

deps:
	@bash scripts/bootstrap.sh run

test-deps:
	@bash scripts/bootstrap.sh test

bench-deps:
	@bash scripts/bootstrap.sh bench

run: deps
	$(VENV)/bin/nodetune run $(ARGS)

lint: test-deps
	$(VENV)/bin/ruff check agent probes metrics host tests bench scripts
	$(VENV)/bin/ruff format --check agent probes metrics host tests bench scripts

test: lint
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Every benchmark in one report (bench/report.py): bench/report.json, bench/report.md,
# bench/plots/*.png and the README's generated block under "Overhead". BENCH_ARGS=--quick: few
# rounds, a smoke run (about 10 minutes); BENCH_ARGS="--only idle": run one again, keep the rest.
BENCH_ARGS ?=
bench: bench-deps
	$(VENV)/bin/python bench/report.py --readme README.md $(BENCH_ARGS)

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

# The agent with its defaults: start -> ready (warm and cold header cache), RSS, idle CPU.
bench-footprint: bench-deps
	$(VENV)/bin/python bench/footprint.py $(FOOTPRINT_ARGS)

bench-locks: bench-deps
	$(VENV)/bin/python bench/lock_connect_overhead.py $(LOCK_ARGS)

# An hour of pod churn with two scrapers: RSS, fds, threads, series and scrape time every minute
# (bench/soak.py; needs the test helpers: the local API server). Not in `bench`: one hour.
SOAK_ARGS ?= --minutes 60
bench-soak: bench-deps test-deps
	$(VENV)/bin/python bench/soak.py $(SOAK_ARGS)

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

# The agent's image, built without a daemon or a registry (mmdebstrap base + buildah); see README
# "Deploy on Kubernetes". Only what is missing is built: a second run reuses the base.
image:
	@bash scripts/image.sh

e2e-deps:
	@bash scripts/bootstrap.sh e2e

# The DaemonSet's pod template under `podman kube play`, scraped by a real Prometheus whose alerts
# reach a real Alertmanager (tests/e2e). Run by .ci/run after `make test`.
e2e: e2e-deps image
	NODETUNE_E2E=1 NODETUNE_REQUIRE_BPF=1 $(VENV)/bin/python -m pytest tests/e2e -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
