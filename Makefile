# husk build and test entry points. The README's two commands are `make run`
# and `make test`; both install what they need first (scripts/install-deps).
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TARGET_DIR ?= $(CURDIR)/target
# The guest's init must be a static binary: the initramfs carries no libc.
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := $(CARGO_TARGET_DIR)/$(AGENT_TARGET)/release/husk-agent
BIN_DIR := $(CARGO_TARGET_DIR)/release
GUEST_DIR ?= /var/lib/husk/guest
GUEST_CACHE ?= /var/cache/husk

.PHONY: deps build agent guest-image run test check fmt clippy

deps:
	./scripts/install-deps

# Host binaries: huskd, husk-vmm, husk-vsock, husk-guest-image, and the
# static husk-agent.
build: deps agent
	$(CARGO) build --release --workspace --exclude husk-agent --bins
	# Next to huskd, which runs it on the host for host pods.
	install -m 0755 $(AGENT_BIN) $(BIN_DIR)/husk-agent

# Built with --target so crt-static applies to the agent only, not to the
# build scripts and proc-macros of the host build.
agent:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release -p husk-agent --target $(AGENT_TARGET)

guest-image: build
	$(BIN_DIR)/husk-guest-image build --agent $(AGENT_BIN) --cache-dir $(GUEST_CACHE) --out $(GUEST_DIR)

# A default pod network unless the host already has a CNI configuration.
run: guest-image
	./scripts/install-cni-config
	exec $(BIN_DIR)/huskd

test: guest-image
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings
	# huskd's unit tests run the real agent on the host (fake backend).
	HUSK_BIN_DIR=$(BIN_DIR) HUSK_GUEST_DIR=$(GUEST_DIR) HUSK_AGENT_BIN=$(AGENT_BIN) \
	  $(CARGO) test --release --no-fail-fast --workspace --exclude husk-tests
	# End-to-end tests boot real VMs: one at a time, the machine has 2 cores.
	HUSK_BIN_DIR=$(BIN_DIR) HUSK_GUEST_DIR=$(GUEST_DIR) \
	  $(CARGO) test --release --no-fail-fast -p husk-tests -- --test-threads=1 \
	  --skip cri_suite_backend_is_stated
	# Uncaptured, so the log says which backend the suite ran on and why.
	HUSK_BIN_DIR=$(BIN_DIR) HUSK_GUEST_DIR=$(GUEST_DIR) \
	  $(CARGO) test --release -p husk-tests --test builtin -- --exact \
	  cri_suite_backend_is_stated --nocapture
