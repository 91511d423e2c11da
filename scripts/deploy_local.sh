#!/usr/bin/env bash
# A real Flower deployment on this machine, over loopback: one SuperLink, N SuperNodes (separate
# processes, each with its own data partition), one run submitted with `flwr run`, then everything
# stopped again. Exits 0 only if the run finished and wrote a fresh summary.json into OUT_DIR.
#
# Secure by default: the script makes a throwaway CA and a server certificate for 127.0.0.1
# (openssl), serves every SuperLink API over TLS, gives each SuperNode its own ECDSA P-384 key pair
# (ssh-keygen), registers the public keys with `flwr supernode register`, and starts the SuperLink with
# --enable-supernode-auth: only registered SuperNodes that trust the CA join. FEDALIGN_DEPLOY_INSECURE=1
# runs everything with --insecure instead (plain text, any SuperNode), with a warning.
#
# Usage: scripts/deploy_local.sh [preset] [num_clients] [out_dir] [section.key=value ...]
#   defaults: tiny, 3, /tmp/fedalign-deploy; extra arguments are passed to the ServerApp as
#   run-config overrides (e.g. federation.rounds=3 train.lr=1e-4).
#
# Environment (all optional):
#   FEDALIGN_SUPERLINK_PORT       SuperLink HTTP port (Fleet, Control and Runtime API)  [19100]
#   FEDALIGN_SUPERNODE_PORTS      comma-separated Runtime API ports, one per SuperNode
#   FEDALIGN_SUPERNODE_BASE_PORT  otherwise SuperNode i listens on BASE+i              [19101]
#   FEDALIGN_DEPLOY_TIMEOUT       seconds to wait for the run to finish                [600]
#   FEDALIGN_DEPLOY_KEEP          1: keep the work directory (staged app, FLWR_HOME, logs)
#   FEDALIGN_OVERRIDES            more overrides, space separated (added after the arguments)
#   FEDALIGN_NODE_CONFIG          more node config for every SuperNode, space separated key=value pairs
#                                 (e.g. "cache-dir='none'": a node that keeps no cache between messages)
#   FEDALIGN_DEPLOY_INSECURE      1: no TLS, no SuperNode authentication (a warning says so)
#   FEDALIGN_DEPLOY_PROBES        1: once the nodes are up, also start a SuperNode with an unregistered key
#                                 and one without the CA, and write whether each was refused to
#                                 OUT_DIR/deploy-logs/probes.json (what the tests check); their Runtime API
#                                 ports: FEDALIGN_PROBE_PORTS="a,b" (default: after the SuperNodes')
#
# Flower 1.42 (as 1.41) serves the SuperLink's Fleet, Control and Runtime APIs on one HTTP port
# (--host/--port, default 127.0.0.1:8000); each SuperNode has its own Runtime API port (default
# 9094). The defaults here avoid 8000, 9091-9094 and Flower's local simulation SuperLink (39091).
# Nothing is downloaded: the ServerApp and ClientApps run in this Python environment
# (SuperLink --disable-runtime-dependency-installation; SuperNodes install nothing by default).
set -euo pipefail

PRESET="${1:-tiny}"
NUM_CLIENTS="${2:-3}"
OUT_DIR="${3:-/tmp/fedalign-deploy}"
shift $(( $# < 3 ? $# : 3 ))
EXTRA_OVERRIDES=("$@")

SUPERLINK_PORT="${FEDALIGN_SUPERLINK_PORT:-19100}"
SUPERNODE_BASE_PORT="${FEDALIGN_SUPERNODE_BASE_PORT:-19101}"
TIMEOUT="${FEDALIGN_DEPLOY_TIMEOUT:-600}"
HOST=127.0.0.1
CONNECTION=local-deployment

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

say() { printf '[deploy %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[deploy %s] error: %s\n' "$(date +%H:%M:%S)" "$1" >&2; exit "${2:-1}"; }

# ---------------------------------------------------------------- arguments and environment
[[ "$NUM_CLIENTS" =~ ^[1-9][0-9]*$ ]] || die "num_clients must be a positive integer, got '$NUM_CLIENTS'" 2
[[ "$TIMEOUT" =~ ^[1-9][0-9]*$ ]] || die "FEDALIGN_DEPLOY_TIMEOUT must be a positive integer" 2
case "$OUT_DIR" in /*) ;; *) OUT_DIR="$PWD/$OUT_DIR" ;; esac   # the ServerApp runs elsewhere
[[ "$OUT_DIR" =~ [[:space:],\'\"] ]] && die "out_dir may not contain spaces, commas or quotes: '$OUT_DIR'" 2

if [ -z "${VIRTUAL_ENV:-}" ] && [ -f "$ROOT/.venv/bin/activate" ]; then
  # shellcheck disable=SC1091
  . "$ROOT/.venv/bin/activate"
fi
INSECURE="${FEDALIGN_DEPLOY_INSECURE:-0}"
[ "$INSECURE" = 1 ] || for bin in openssl ssh-keygen; do
  command -v "$bin" >/dev/null || die "'$bin' not found on PATH (it makes the TLS certificates and SuperNode keys; or set FEDALIGN_DEPLOY_INSECURE=1)" 127
done
for bin in flower-superlink flower-supernode flwr python; do
  command -v "$bin" >/dev/null || die "'$bin' not found on PATH (run scripts/setup.sh first)" 127
done
python -c 'import fedalign_moe' 2>/dev/null \
  || die "fedalign_moe is not importable from $(command -v python); install it (pip install -e .)" 127

if [ -n "${FEDALIGN_SUPERNODE_PORTS:-}" ]; then
  IFS=',' read -r -a SUPERNODE_PORTS <<< "$FEDALIGN_SUPERNODE_PORTS"
  [ "${#SUPERNODE_PORTS[@]}" -ge "$NUM_CLIENTS" ] \
    || die "FEDALIGN_SUPERNODE_PORTS lists ${#SUPERNODE_PORTS[@]} ports for $NUM_CLIENTS SuperNodes" 2
else
  SUPERNODE_PORTS=()
  for ((i = 0; i < NUM_CLIENTS; i++)); do SUPERNODE_PORTS+=($((SUPERNODE_BASE_PORT + i))); done
fi

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
for port in "$SUPERLINK_PORT" "${SUPERNODE_PORTS[@]:0:NUM_CLIENTS}"; do
  port_open "$port" && die "port $HOST:$port is already in use (set FEDALIGN_SUPERLINK_PORT / FEDALIGN_SUPERNODE_PORTS)" 3
done

# Everything Flower writes (installed FABs, CLI connections) goes under a private FLWR_HOME.
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fedalign-deploy.XXXXXX")"
LOGS="$WORK/logs"
mkdir -p "$LOGS" "$WORK/flwr-home"
export FLWR_HOME="$WORK/flwr-home"
export FLWR_TELEMETRY_ENABLED="${FLWR_TELEMETRY_ENABLED:-0}"
export FLWR_DISABLE_UPDATE_CHECK="${FLWR_DISABLE_UPDATE_CHECK:-1}"

# ---------------------------------------------------------------- cleanup
PIDS=()        # processes this script started
RUN_OK=0
descendants() {  # all descendants of a pid (SuperExec, flwr-serverapp, flwr-clientapp)
  local child
  for child in $(pgrep -P "$1" 2>/dev/null || true); do
    echo "$child"
    descendants "$child"
  done
}
cleanup() {
  local rc=$? all=() pid deadline
  trap - EXIT INT TERM
  if [ "$rc" != 0 ]; then   # what each process said last, before it is stopped (run.log was shown)
    for f in "$LOGS"/*.log; do
      [ -f "$f" ] && [ "$(basename "$f")" != run.log ] || continue
      echo "----- last lines of $f -----" >&2
      tail -n 10 "$f" | sed 's/\x1b\[[0-9;]*m//g' >&2 || true
    done
  fi
  for pid in "${PIDS[@]}"; do
    all+=("$pid")
    while read -r d; do [ -n "$d" ] && all+=("$d"); done < <(descendants "$pid")
  done
  if [ "${#all[@]}" -gt 0 ]; then
    say "stopping ${#all[@]} processes"
    kill -TERM "${all[@]}" 2>/dev/null || true
    deadline=$((SECONDS + 15))
    for pid in "${all[@]}"; do
      while kill -0 "$pid" 2>/dev/null && [ "$(ps -o stat= -p "$pid" 2>/dev/null | cut -c1)" != Z ] \
            && [ "$SECONDS" -lt "$deadline" ]; do
        sleep 0.2
      done
    done
    kill -KILL "${all[@]}" 2>/dev/null || true
    wait 2>/dev/null || true
  fi
  if [ "$RUN_OK" = 1 ] && [ "$rc" = 0 ]; then
    mkdir -p "$OUT_DIR/deploy-logs" && cp "$LOGS"/*.log "$OUT_DIR/deploy-logs/" 2>/dev/null || true
  fi
  if [ "${FEDALIGN_DEPLOY_KEEP:-0}" = 1 ] || [ "$rc" != 0 ]; then
    say "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---------------------------------------------------------------- certificates and SuperNode keys
PKI="$WORK/pki"
TLS_LINK=(--insecure)
TLS_NODE=(--insecure)
if [ "$INSECURE" = 1 ]; then
  say "WARNING: FEDALIGN_DEPLOY_INSECURE=1: no TLS and no SuperNode authentication; anyone who reaches" \
      "$HOST:$SUPERLINK_PORT can join as a SuperNode, read the model and submit or stop runs"
else
  mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:3072 -nodes -days 2 -subj "/CN=fedalign-deploy throwaway CA" \
      -keyout ca.key -out ca.crt
    openssl req -newkey rsa:3072 -nodes -subj "/CN=$HOST" -keyout server.key -out server.csr
    printf 'subjectAltName=IP:%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
      "$HOST" > server.ext
    openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile server.ext \
      -out server.pem
    for ((i = 0; i < NUM_CLIENTS; i++)); do ssh-keygen -q -t ecdsa -b 384 -N "" -C "supernode-$i" -f "node-$i"; done
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "never registered" -f node-unregistered
  ) > "$LOGS/pki.log" 2>&1 || die "could not make the certificates and keys (see $LOGS/pki.log)"
  chmod 600 "$PKI"/*.key "$PKI"/node-*
  export FEDALIGN_CA_CERT="$PKI/ca.crt"
  TLS_LINK=(--ssl-ca-certfile "$PKI/ca.crt" --ssl-certfile "$PKI/server.pem" --ssl-keyfile "$PKI/server.key"
            --enable-supernode-auth)
  TLS_NODE=(--root-certificates "$PKI/ca.crt")
  say "TLS with a throwaway CA ($PKI/ca.crt) and SuperNode authentication"
fi

# ---------------------------------------------------------------- the app, as `flwr run` sees it
# `flwr run DIR` migrates a [tool.flwr.federations] table of DIR/pyproject.toml into the Flower
# config and comments it out in place; run from a staged copy so the checkout is never modified.
APP="$WORK/app"
mkdir -p "$APP"
cp -R "$ROOT/src" "$APP/src"
find "$APP" -name __pycache__ -type d -prune -exec rm -rf {} +
python - "$ROOT/pyproject.toml" "$APP/pyproject.toml" "$WORK/run_config.toml" "$FLWR_HOME/config.toml" \
  "$PRESET" "$OUT_DIR" "$NUM_CLIENTS" "$HOST:$SUPERLINK_PORT" "$CONNECTION" \
  "${EXTRA_OVERRIDES[@]}" ${FEDALIGN_OVERRIDES:-} <<'PY'
import os, sys, tomllib
import tomli_w

src, app_toml, run_toml, flwr_config, preset, out_dir, n, address, conn, *extra = sys.argv[1:]
with open(src, "rb") as f:
    project = tomllib.load(f)
project.get("tool", {}).get("flwr", {}).pop("federations", None)
with open(app_toml, "wb") as f:
    tomli_w.dump(project, f)
overrides = [f"out_dir={out_dir}", f"partition.num_clients={n}", *extra]
with open(run_toml, "wb") as f:
    tomli_w.dump({"preset": preset, "overrides": " ".join(overrides)}, f)
ca = os.environ.get("FEDALIGN_CA_CERT")  # TLS: the CLI trusts the throwaway CA; otherwise plain text
security = {"root-certificates": ca} if ca else {"insecure": True}
with open(flwr_config, "wb") as f:
    tomli_w.dump({"superlink": {"default": conn, conn: {"address": address, **security}}}, f)
PY

# ---------------------------------------------------------------- SuperLink and SuperNodes
say "SuperLink on $HOST:$SUPERLINK_PORT; $NUM_CLIENTS SuperNodes on ports ${SUPERNODE_PORTS[*]:0:NUM_CLIENTS}"
say "logs: $LOGS"
flower-superlink "${TLS_LINK[@]}" --host "$HOST" --port "$SUPERLINK_PORT" \
  --isolation subprocess --disable-runtime-dependency-installation \
  > "$LOGS/superlink.log" 2>&1 &
SUPERLINK_PID=$!
PIDS+=("$SUPERLINK_PID")

wait_port() {  # port pid what
  local t0=$SECONDS
  until port_open "$1"; do
    kill -0 "$2" 2>/dev/null || die "$3 exited during startup (see its log)"
    [ $((SECONDS - t0)) -lt 60 ] || die "$3 did not open $HOST:$1 within 60 s"
    sleep 0.3
  done
}
wait_port "$SUPERLINK_PORT" "$SUPERLINK_PID" "the SuperLink"

if [ "$INSECURE" != 1 ]; then  # register every SuperNode's public key before it connects
  for ((i = 0; i < NUM_CLIENTS; i++)); do
    flwr supernode register "$PKI/node-$i.pub" "$CONNECTION" --name "supernode-$i" >> "$LOGS/register.log" 2>&1 \
      || die "could not register SuperNode $i's key (see $LOGS/register.log)"
  done
fi

node_key() { [ "$INSECURE" = 1 ] || printf '%s\n' --auth-supernode-private-key "$PKI/node-$1"; }
NODE_PIDS=()
for ((i = 0; i < NUM_CLIENTS; i++)); do
  mapfile -t KEY_ARGS < <(node_key "$i")
  flower-supernode "${TLS_NODE[@]}" "${KEY_ARGS[@]}" --superlink "$HOST:$SUPERLINK_PORT" \
    --host "$HOST" --port "${SUPERNODE_PORTS[$i]}" --isolation subprocess \
    --node-config "partition-id=$i num-partitions=$NUM_CLIENTS${FEDALIGN_NODE_CONFIG:+ $FEDALIGN_NODE_CONFIG}" \
    > "$LOGS/supernode-$i.log" 2>&1 &
  NODE_PIDS+=($!)
  PIDS+=($!)
done
for ((i = 0; i < NUM_CLIENTS; i++)); do
  wait_port "${SUPERNODE_PORTS[$i]}" "${NODE_PIDS[$i]}" "SuperNode $i"
done
say "all processes up ($((SECONDS))s)"

# ---------------------------------------------------------------- probes: who must be refused
probe_start() {  # name, then flower-supernode arguments: starts a SuperNode that should be refused
  local name=$1
  shift
  flower-supernode "$@" --superlink "$HOST:$SUPERLINK_PORT" --host "$HOST" --max-retries 1 \
    --max-wait-time 5 --isolation subprocess --node-config "partition-id=0 num-partitions=$NUM_CLIENTS" \
    > "$LOGS/probe-$name.log" 2>&1 &
  PROBE_PIDS+=($!)
}
probe_refused() {  # name, pid, the refusal its log must show: prints true when it was refused
  local t0=$SECONDS
  while kill -0 "$2" 2>/dev/null && [ $((SECONDS - t0)) -lt 40 ]; do sleep 0.5; done
  if kill -0 "$2" 2>/dev/null; then kill -KILL "$2" 2>/dev/null; wait "$2" 2>/dev/null; echo false; return; fi
  grep -q "$3" "$LOGS/probe-$1.log" && echo true || echo false
}
if [ "${FEDALIGN_DEPLOY_PROBES:-0}" = 1 ] && [ "$INSECURE" != 1 ]; then
  IFS=',' read -r P1 P2 <<< "${FEDALIGN_PROBE_PORTS:-$((SUPERNODE_BASE_PORT + NUM_CLIENTS + 10)),$((SUPERNODE_BASE_PORT + NUM_CLIENTS + 11))}"
  PROBE_PIDS=()  # both at once
  probe_start unregistered --port "$P1" "${TLS_NODE[@]}" --auth-supernode-private-key "$PKI/node-unregistered"
  probe_start no-ca --port "$P2" --auth-supernode-private-key "$PKI/node-0"
  PIDS+=("${PROBE_PIDS[@]}")
  unregistered=$(probe_refused unregistered "${PROBE_PIDS[0]}" "Failed to activate SuperNode")
  no_ca=$(probe_refused no-ca "${PROBE_PIDS[1]}" "CERTIFICATE_VERIFY_FAILED")
  bound=$(python - "$SUPERLINK_PORT" <<'PY'
import sys
port = int(sys.argv[1])
listen = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    try:
        lines = open(table).read().splitlines()[1:]
    except OSError:
        continue
    for line in lines:
        local, state = line.split()[1], line.split()[3]
        address, p = local.rsplit(":", 1)
        if state == "0A" and int(p, 16) == port:  # LISTEN
            raw = bytes.fromhex(address)
            if len(raw) == 4:  # /proc/net/tcp: little-endian IPv4
                listen.add(".".join(str(b) for b in reversed(raw)))
            else:
                listen.add(raw.hex())
print(",".join(sorted(listen)))
PY
)
  PROBES="{\"unregistered_key_refused\": $unregistered, \"no_ca_refused\": $no_ca, \"superlink_listen\": \"$bound\"}"
  say "probes: $PROBES"
fi

# ---------------------------------------------------------------- submit and wait
say "flwr run $CONNECTION: preset=$PRESET, out_dir=$OUT_DIR"
touch "$WORK/started"
flwr run "$APP" "$CONNECTION" --run-config "$WORK/run_config.toml" --format json > "$WORK/submit.json" \
  2> "$LOGS/submit.log" || { cat "$WORK/submit.json" >&2; die "flwr run failed to submit the run"; }
RUN_ID="$(python -c 'import json, sys; print(json.load(open(sys.argv[1]))["run-id"] or "")' "$WORK/submit.json")"
[ -n "$RUN_ID" ] || die "flwr run returned no run id: $(cat "$WORK/submit.json")"
say "run $RUN_ID submitted; streaming its log (timeout ${TIMEOUT}s)"

# `flwr log --stream` returns once the run has finished and all its logs are in.
flwr log "$RUN_ID" "$CONNECTION" --stream > >(tee "$LOGS/run.log") 2>&1 &
STREAM_PID=$!
PIDS+=("$STREAM_PID")
deadline=$((SECONDS + TIMEOUT))
while kill -0 "$STREAM_PID" 2>/dev/null; do
  for pid in "$SUPERLINK_PID" "${NODE_PIDS[@]}"; do
    kill -0 "$pid" 2>/dev/null || die "a SuperLink/SuperNode process ($pid) died during the run"
  done
  if [ "$SECONDS" -ge "$deadline" ]; then
    flwr stop "$RUN_ID" "$CONNECTION" >> "$LOGS/submit.log" 2>&1 || true
    die "run $RUN_ID did not finish within ${TIMEOUT}s" 124
  fi
  sleep 1
done
wait "$STREAM_PID" 2>/dev/null || true

STATUS="$(flwr ls "$CONNECTION" --run-id "$RUN_ID" --format json 2>>"$LOGS/submit.log" | python -c '
import json, sys
try:
    runs = json.load(sys.stdin).get("runs", [])
    print(runs[0]["status"] if runs else "unknown")
except Exception:
    print("unknown")')"
say "run $RUN_ID: $STATUS ($((SECONDS))s since start)"

SUMMARY="$OUT_DIR/summary.json"
if [ ! -f "$SUMMARY" ] || [ ! "$SUMMARY" -nt "$WORK/started" ]; then
  die "the run did not produce $SUMMARY (status: $STATUS)"
fi
[[ "$STATUS" == *failed* || "$STATUS" == *stopped* ]] && die "run status is $STATUS"
RUN_OK=1
if [ -n "${PROBES:-}" ]; then mkdir -p "$OUT_DIR/deploy-logs" && printf '%s\n' "$PROBES" > "$OUT_DIR/deploy-logs/probes.json"; fi
python - "$SUMMARY" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
acc = ", ".join(f"{a:.3f}" for a in s.get("accuracy_per_round", []))
print(f"[deploy] summary: {s.get('rounds')} rounds, accuracy per round [{acc}], "
      f"uplink {s.get('uplink_bytes_total')} B, wall {s.get('wall_seconds')} s")
PY
say "done: $SUMMARY"
