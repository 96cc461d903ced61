# Every developer command. `make help` lists them.
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
# One shared target directory, outside the repository, reused by every checkout.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/imagegc/target
CARGO ?= cargo

.PHONY: help deps build test unit e2e lint fmt generate check-generated ci demo bench-remove testbed-up testbed-down

help: ## List the commands.
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-14s %s\n", $$1, $$2}'

deps: ## Install Debian packages and build the pinned Go test binaries (cached).
	bash hack/deps.sh

build: ## Build everything, tests included.
	$(CARGO) build --workspace --all-targets

test: deps ## Run every test: unit tests, then the end-to-end suite on real containerd 2.x/1.6 and kube-apiserver.
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test --workspace --test e2e

unit: ## Unit tests of the pure core only (no daemons).
	$(CARGO) test --workspace --lib --bins

e2e: deps ## The end-to-end suite only (pass a filter with ARGS=...).
	$(CARGO) test --test e2e -- $(ARGS)

fmt: ## Format the code.
	$(CARGO) fmt --all

lint: ## Formatting and clippy, as CI checks them.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

generate: ## Regenerate crds/ from the API types.
	$(CARGO) run -q --bin imagegc -- crdgen > crds/imagegc.dev.yaml

check-generated: ## Fail if crds/ is stale.
	$(CARGO) run -q --bin imagegc -- crdgen | diff -u crds/imagegc.dev.yaml - || { echo "crds/ is stale: run make generate" >&2; exit 1; }

ci: deps lint check-generated test ## What CI runs (.ci/run).

demo: deps ## Run imagegc end to end on a local test bed (3 simulated nodes, a real API server).
	bash hack/demo.sh

bench-remove: deps ## Time removing K images: imagegc vs a sequential CRI RemoveImage loop.
	$(CARGO) bench --bench remove

testbed-up: ## Start the test bed in the background (then: eval "$$(hack/testbed env)").
	bash hack/testbed up

testbed-down: ## Stop the test bed.
	bash hack/testbed down
