#!/usr/bin/env bash
# Reproduces the numbers of BENCHMARKS.md ("Checks through the plugin"): builds release, starts a
# fleet of simulated targets (one `healthy`, one `nla_healthy` knowing the account `bench`), then
# for each bench starts a fresh `rdp-preflight serve` (so that its peak RSS belongs to that bench
# alone), runs `gateway-sim bench` against it with the direct baseline, and stops it. Everything
# listens on 127.0.0.1 only; every process started here is stopped on exit.
#
#   scripts/bench.sh                 # all benches, 10 s per phase
#   DURATION=3 scripts/bench.sh      # shorter phases
#   JSON=1 scripts/bench.sh          # JSON reports instead of tables
#   SKIP_BUILD=1 scripts/bench.sh    # use the release binaries already in target/release
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10}"
JSON_FLAG=()
if [[ "${JSON:-0}" == 1 ]]; then JSON_FLAG=(--json); fi

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then cargo build --release --locked -p rdp-preflight -p gateway-sim; fi
SIM=target/release/gateway-sim
PLUGIN=target/release/rdp-preflight

WORK="$(mktemp -d)"
FLEET_PID=""
PLUGIN_PID=""
cleanup() {
    if [[ -n "$PLUGIN_PID" ]]; then kill "$PLUGIN_PID" 2>/dev/null || true; wait "$PLUGIN_PID" 2>/dev/null || true; fi
    if [[ -n "$FLEET_PID" ]]; then kill "$FLEET_PID" 2>/dev/null || true; wait "$FLEET_PID" 2>/dev/null || true; fi
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

cat >"$WORK/scenario.toml" <<'EOF'
[[target]]
name = "bench-healthy"
behavior = "healthy"

[[target]]
name = "bench-nla"
behavior = "nla_healthy"

[[account]]
name = "bench"
password = "Bench-Pass-1"
state = "good"
EOF

# The fleet: its trust bundle and manifest; no directory (the NLA target judges the credential).
"$SIM" targets --scenario "$WORK/scenario.toml" --no-directory \
    --ca-out "$WORK/ca.pem" --manifest-out "$WORK/fleet.json" >"$WORK/fleet.log" 2>&1 &
FLEET_PID=$!
for _ in $(seq 100); do [[ -s "$WORK/fleet.json" ]] && break; sleep 0.1; done
[[ -s "$WORK/fleet.json" ]] || { echo "fleet did not start:" >&2; cat "$WORK/fleet.log" >&2; exit 1; }

# The plugin: loopback targets allowed, the fleet's CA trusted, pins in memory, no directory.
cat >"$WORK/plugin.toml" <<EOF
[policy]
allow_loopback = true

[cert]
trust_anchors = ["$WORK/ca.pem"]
pin_store = "memory"

[log]
level = "warn"
EOF

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start_plugin() {
    local port
    port="$(free_port)"
    "$PLUGIN" serve --config "$WORK/plugin.toml" --listen "127.0.0.1:$port" 2>>"$WORK/plugin.log" &
    PLUGIN_PID=$!
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            PLUGIN_URL="http://127.0.0.1:$port"
            return 0
        fi
        sleep 0.1
    done
    echo "plugin did not start:" >&2
    cat "$WORK/plugin.log" >&2
    exit 1
}

stop_plugin() {
    kill "$PLUGIN_PID" 2>/dev/null || true
    wait "$PLUGIN_PID" 2>/dev/null || true
    PLUGIN_PID=""
}

# bench TITLE [gateway-sim bench options…]
bench() {
    local title="$1"
    shift
    echo "=== $title"
    start_plugin
    "$SIM" bench --plugin "$PLUGIN_URL" --plugin-pid "$PLUGIN_PID" --fleet-manifest "$WORK/fleet.json" \
        --duration "$DURATION" --baseline ${JSON_FLAG[@]+"${JSON_FLAG[@]}"} "$@"
    stop_plugin
    echo
}

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo
bench "TLS target, concurrency 1" --concurrency 1
bench "TLS target, concurrency 8" --concurrency 8
bench "TLS target, concurrency 32" --concurrency 32
bench "NLA target, NEGOTIATE/CHALLENGE, concurrency 1" --nla --concurrency 1
bench "NLA target, NEGOTIATE/CHALLENGE, concurrency 8" --nla --concurrency 8
bench "NLA target, full logon, concurrency 1" --nla --credential bench --scenario "$WORK/scenario.toml" --concurrency 1
bench "NLA target, full logon, concurrency 8" --nla --credential bench --scenario "$WORK/scenario.toml" --concurrency 8
