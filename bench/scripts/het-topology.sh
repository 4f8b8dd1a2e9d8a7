#!/usr/bin/env bash
# HET's topology on one GPU host: the two shards in a network namespace of their own, behind one
# link limited to RATE each way (a token bucket on both ends of a veth pair), and NPROC trainer
# ranks under torchrun in the host's namespace, all sharing that link and the GPU
# (examples/python/deepfm.py: each rank a cache of its own, the dense part in DDP over gloo).
# For each config it starts fresh tables, trains one epoch and writes OUT_DIR/CONFIG.json; at the
# end it prints samples/s, embedding bytes a sample, time to the target AUC and the final AUC of
# each, and the cached run's speed-up over the uncached one beside their byte ratio.
#
#   bash bench/scripts/het-topology.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds release builds made elsewhere (the GPU host needs no cargo): `hetkv`,
# `hetkv-bench` and the hetkv wheel. Needs root, `ip` and `tc` (bench/scripts/iproute-from-debs.sh
# supplies them where the host has no iproute2) and a python3 with numpy and torch. RATE
# (1gbit), NPROC (8), SAMPLES (800000), DEVICE (cuda), PY (python3), CONFIGS ("cache nocache"),
# TARGET (0.80) and DIM (127) can be set in the environment. Only 10.88.0.0/24 is used; the
# namespace and the daemons go on exit, also when interrupted.
set -euo pipefail
bin=$(cd "$1" && pwd); out=$(mkdir -p "$2" && cd "$2" && pwd)
example=$(cd "$(dirname "$0")/../.." && pwd)/examples/python/deepfm.py
py=${PY:-python3}
rate=${RATE:-1gbit}; nproc=${NPROC:-8}; configs=${CONFIGS:-cache nocache}
ns=hetkv-het-srv
die() { echo "het-topology: $*" >&2; exit 1; }
command -v ip >/dev/null && command -v tc >/dev/null || die "needs ip and tc (iproute2)"
[ "$(id -u)" = 0 ] || die "needs root (network namespaces)"
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
lib=$(mktemp -d)
$py -m pip install --quiet --no-deps --no-index --target "$lib" "$bin"/hetkv-*.whl
export PYTHONPATH=$lib
$py -c "import hetkv, torch; print('hetkv', hetkv.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"

cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del hk-het0 2>/dev/null || true
}
trap cleanup EXIT
cleanup
ip netns add "$ns"
ip link add hk-het0 type veth peer name hk-het1
ip link set hk-het1 netns "$ns"
ip addr add 10.88.0.2/24 dev hk-het0
ip link set hk-het0 up
ip netns exec "$ns" ip addr add 10.88.0.1/24 dev hk-het1
ip netns exec "$ns" ip link set hk-het1 up
ip netns exec "$ns" ip link set lo up
# The link: RATE each way, as a switch port would give it.
tc qdisc add dev hk-het0 root tbf rate "$rate" burst 512kb latency 100ms
ip netns exec "$ns" tc qdisc add dev hk-het1 root tbf rate "$rate" burst 512kb latency 100ms

data=$(mktemp -d)
"$bin/hetkv-bench" criteo --samples "${SAMPLES:-800000}" --tsv "$data/c.tsv" --json "$data/c.json" | tail -1
cp "$data/c.json" "$out/criteo.json"
for i in 0 1; do
  RUST_LOG=warn ip netns exec "$ns" "$bin/hetkv" serve --listen "10.88.0.1:700$i" --shard $i --shards 2 \
    2>"$out/daemon$i.log" &
done
sleep 1
port=29511
for c in $configs; do
  case $c in
    cache) cfg=(--cache 0.1 --bound 100) ;;
    nocache) cfg=(--cache 0 --bound 0) ;;
    *) die "unknown config $c (cache or nocache)" ;;
  esac
  echo "== $c: $nproc ranks, link $rate"
  port=$((port + 1))
  timeout 400 $py -m torch.distributed.run --nproc-per-node "$nproc" --master-port "$port" "$example" \
    --tsv "$data/c.tsv" --report "$data/c.json" --npz "$data/c.npz" --device "${DEVICE:-cuda}" \
    --cluster 10.88.0.1:7000,10.88.0.1:7001 --transport tcp --table "het_$c" \
    --dim "${DIM:-127}" --batch 128 --eval-every 5 --target-auc "${TARGET:-0.80}" \
    --json "$out/$c.json" "${cfg[@]}" 2>&1 | grep -v "Warning\|sparse_coo\|OMP_NUM_THREADS\|\*\*\*\*" | tail -3
done

$py - "$out" $configs <<'EOF'
import json, sys
out, configs = sys.argv[1], sys.argv[2:]
runs = {c: json.load(open(f"{out}/{c}.json")) for c in configs}
print("| run | ranks | samples/s | embedding KB a sample | time to target AUC | final AUC | logloss |")
print("|---|---:|---:|---:|---:|---:|---:|")
for c, r in runs.items():
    kb = (r["bytes_sent"] + r["bytes_received"]) / r["samples"] / 1e3
    ttt = "-" if r["time_to_target"] is None else f"{r['time_to_target']:.0f} s"
    print(f"| {c} | {r['world']} | {r['samples_per_s']:,.0f} | {kb:.2f} | {ttt} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} |")
if {"cache", "nocache"} <= set(runs):
    c, n = runs["cache"], runs["nocache"]
    speed = c["samples_per_s"] / n["samples_per_s"]
    bytes_ratio = ((n["bytes_sent"] + n["bytes_received"]) / n["samples"]) / ((c["bytes_sent"] + c["bytes_received"]) / c["samples"])
    sooner = (n["time_to_target"] / c["time_to_target"]) if c["time_to_target"] and n["time_to_target"] else None
    print(f"cache over no cache: {speed:.2f}x samples/s, {bytes_ratio:.2f}x fewer bytes a sample, "
          + (f"{sooner:.2f}x sooner to the target" if sooner else "target not reached by both")
          + f", AUC {c['test_auc'] - n['test_auc']:+.4f}")
EOF
