#!/usr/bin/env bash
# Runs every test of the project on a fresh machine: installs the real peers the integration
# tests use (OpenLDAP slapd, FreeRDP's shadow server, PostgreSQL) from Debian's packages when absent, then
# checks formatting and lints and runs the whole workspace's tests.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/install-test-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
