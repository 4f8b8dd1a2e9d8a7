#!/usr/bin/env bash
# A hetkv training cluster on one machine, every host in its own network namespace.
#
#   bench/scripts/netns-cluster.sh [--rates "1gbit 10gbit"] [--delay 100us] [--shards 2]
#       [--workers 4] [--out DIR] [--configs "cache:100 nocache"] [--bin-dir DIR]
#       [--summary-only] -- [hetkv-bench train args...]
#
# For each rate it makes a switch namespace holding a bridge, one namespace per daemon, per worker
# and for the coordinator (which creates the tables and evaluates during training), each joined to
# the bridge by a veth pair. Every link is limited by tc to the rate in both directions (a token
# bucket on each end), with the delay added by netem where the kernel has it (the script says so
# when it has not). For each config it starts fresh daemons, runs `hetkv-bench train` with the
# workers as processes in their namespaces, and writes DIR/RATE-CONFIG.json; at the end it prints
# a summary, time to accuracy included, and for each configuration its speed-up over `nocache`
# beside the ratio of bytes a sample the two move (the most it can gain where the links bind).
# A config is `cache:BOUND` (LFU cache, both bounds BOUND; a modifier `:pushN` sets the write
# bound to N apart)
# or `nocache` (the classic parameter server), either followed by modifiers: `:prefetch`
# (`--prefetch`: the next batch's lookups overlap this batch's compute), `:warmupN`
# (`--warmup-batches N`: each worker's first N batches at bounds 0) and `:push-whole` or
# `:share-weighted` (`--update-rule`; push-whole, HET's semantics, when none is given), as in
# `cache:100:prefetch:share-weighted`. The optimizer is the trainer's (`-- --optimizer adagrad`). Only addresses inside these namespaces are used
# (10.77.0.0/24). Every namespace it made is removed on exit, also when interrupted.
# A second network, unlimited, joins the daemons and the coordinator only (10.77.1.0/24): the
# coordinator's evaluations read the model through it (`--eval-servers`), so they neither wait on
# the training links nor take their bandwidth; the workers train through the limited links
# alone. --no-eval-net leaves it out (the evaluations then share the training links, as before
# 2026-12-03).
# --summary-only prints the summary of the JSON files already in DIR.
#
# Needs root, iproute2 (ip, tc) and python3. Builds the release binaries with cargo, unless
# --bin-dir names a folder holding release builds of `hetkv` and `hetkv-bench` made elsewhere (a
# host with no cargo; bench/scripts/iproute-from-debs.sh supplies `ip` and `tc` where the host has
# no iproute2).
set -euo pipefail

RATES="1gbit 10gbit"
DELAY="100us"
SHARDS=2
WORKERS=4
OUT="bench-out/netns"
CONFIGS="cache:100 nocache"
SUMMARY_ONLY=no
BIN_DIR=""
EVAL_NET=yes
while [[ $# -gt 0 ]]; do
    case "$1" in
        --rates) RATES="$2"; shift 2 ;;
        --delay) DELAY="$2"; shift 2 ;;
        --shards) SHARDS="$2"; shift 2 ;;
        --workers) WORKERS="$2"; shift 2 ;;
        --out) OUT="$2"; shift 2 ;;
        --configs) CONFIGS="$2"; shift 2 ;;
        --bin-dir) BIN_DIR="$2"; shift 2 ;;
        --no-eval-net) EVAL_NET=no; shift ;;
        --summary-only) SUMMARY_ONLY=yes; shift ;;
        --) shift; break ;;
        *) echo "netns-cluster: unknown option $1" >&2; exit 2 ;;
    esac
done
TRAIN_ARGS=("$@")

die() { echo "netns-cluster: $*" >&2; exit 1; }
command -v python3 >/dev/null || die "needs python3 for the summary"

summary() {
python3 - "$OUT" "$RATES" "$CONFIGS" "$DELAY" <<'EOF'
import json, os, sys
out, rates, configs, delay = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), sys.argv[4]
netem = open(f"{out}/netem").read().strip() if os.path.exists(f"{out}/netem") else "unknown"
print(f"\nlinks: token bucket at the rate, each way; delay: {delay if netem == 'yes' else 'none (no netem in this kernel)'}")
print("| link | run | samples/s | embedding B/sample | dense B/sample | hit rate | final AUC | final logloss | time to target AUC |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
ratios = []
for rate in rates:
    runs = {c: json.load(open(f"{out}/{rate}-{c}.json")) for c in configs}
    for c, r in runs.items():
        s = r["cache"]
        uniq = s["unique_keys"] or 1
        ttt = r["time_to_target"]
        target = r["settings"]["target_auc"]
        print(f"| {rate} | {c} | {r['samples_per_s']:,.0f} | {r['embedding_bytes_per_sample']:.0f} | "
              f"{r['dense_bytes_per_sample']:.0f} | {100 * s['hits'] / uniq:.1f}% | {r['auc']:.4f} | {r['logloss']:.4f} | "
              + (f"{ttt:.2f} s (AUC {target})" if ttt is not None else f"not reached ({target})") + " |")
    base = runs.get("nocache")
    # Where the links bind, samples/s go as the inverse of the bytes a sample moves: the ratio of
    # those bytes is the most a configuration can gain over no cache at this rate.
    moved = lambda r: r["embedding_bytes_per_sample"] + r["dense_bytes_per_sample"]
    for c, r in runs.items():
        if c == "nocache" or not base:
            continue
        speed = r["samples_per_s"] / base["samples_per_s"]
        ceiling = moved(base) / max(moved(r), 1e-9)
        time = (f"reaches the target {base['time_to_target'] / r['time_to_target']:.2f}x as fast as nocache"
                if r["time_to_target"] and base["time_to_target"] else "time to target: not reached by both")
        ratios.append(f"- {rate}: {c} {time}, at {speed:.2f}x its samples/s; it moves {ceiling:.2f}x fewer "
                      f"bytes a sample (embedding and dense), so {speed / ceiling:.0%} of the speed-up the bytes allow")
print()
print("\n".join(ratios))
EOF
}
if [[ $SUMMARY_ONLY == yes ]]; then summary; exit 0; fi

[[ $(id -u) -eq 0 ]] || die "needs root (network namespaces and tc)"
command -v ip >/dev/null && command -v tc >/dev/null || die "needs iproute2 (ip, tc)"

[[ -z $BIN_DIR ]] || BIN_DIR="$(realpath "$BIN_DIR")"
cd "$(dirname "$0")/../.."
if [[ -n $BIN_DIR ]]; then
    TARGET="$BIN_DIR"
else
    cargo build --release -q -p hetkv-store -p hetkv-bench
    TARGET="${CARGO_TARGET_DIR:-target}/release"
fi
HETKV="$(realpath "$TARGET/hetkv")"
BENCH="$(realpath "$TARGET/hetkv-bench")"
[[ -x $HETKV && -x $BENCH ]] || die "no hetkv and hetkv-bench in $TARGET"
mkdir -p "$OUT"

P="hk$$"                      # namespace prefix: unique per run
NAMESPACES=()
DAEMONS=()
cleanup() {
    for pid in "${DAEMONS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${DAEMONS[@]}"; do wait "$pid" 2>/dev/null || true; done
    DAEMONS=()
    for ns in "${NAMESPACES[@]}"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    NAMESPACES=()
}
trap cleanup EXIT
trap 'echo "netns-cluster: interrupted" >&2; exit 130' INT TERM

# Rate in bits/s for tc's token bucket: burst of a few milliseconds at the rate, at least 64 KiB.
bits() {
    python3 -c "import re,sys; m=re.fullmatch(r'(\d+)([kmg]?)bit','$1'.lower()) or sys.exit('bad rate $1'); print(int(m[1])*{'':1,'k':10**3,'m':10**6,'g':10**9}[m[2]])"
}

NETEM=yes
shape() { # namespace device rate delay
    local ns=$1 dev=$2 rate=$3 delay=$4 burst
    burst=$(( $(bits "$rate") / 8 / 250 ))
    (( burst < 65536 )) && burst=65536
    if [[ $NETEM == yes ]] && ip netns exec "$ns" tc qdisc add dev "$dev" root handle 1: netem delay "$delay" 2>/dev/null; then
        ip netns exec "$ns" tc qdisc add dev "$dev" parent 1: handle 2: tbf rate "$rate" burst "$burst" latency 50ms
    else
        if [[ $NETEM == yes ]]; then
            echo "netns-cluster: this kernel has no netem qdisc: links are rate-limited with no added delay" >&2
            NETEM=no
        fi
        ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "$rate" burst "$burst" latency 50ms
    fi
}

make_cluster() { # rate
    local rate=$1 sw="${P}sw" n=0 node
    ip netns add "$sw"; NAMESPACES+=("$sw")
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    NODES=()
    for ((s = 0; s < SHARDS; s++)); do NODES+=("s$s"); done
    NODES+=("c")
    for ((w = 0; w < WORKERS; w++)); do NODES+=("w$w"); done
    for node in "${NODES[@]}"; do
        n=$((n + 1))
        ip netns add "$P$node"; NAMESPACES+=("$P$node")
        ip -n "$sw" link add "$node" type veth peer name eth0 netns "$P$node"
        ip -n "$sw" link set "$node" master br0 up
        ip -n "$P$node" link set lo up
        ip -n "$P$node" addr add "10.77.0.$n/24" dev eth0
        ip -n "$P$node" link set eth0 up
        shape "$P$node" eth0 "$rate" "$DELAY"
        shape "$sw" "$node" "$rate" "$DELAY"
        ADDR[$node]="10.77.0.$n"
    done
    [[ $EVAL_NET == yes ]] || return 0
    ip -n "$sw" link add br1 type bridge
    ip -n "$sw" link set br1 up
    n=0
    for node in "${NODES[@]}"; do
        n=$((n + 1))
        [[ $node == s* || $node == c ]] || continue
        ip -n "$sw" link add "e$node" type veth peer name eth1 netns "$P$node"
        ip -n "$sw" link set "e$node" master br1 up
        ip -n "$P$node" addr add "10.77.1.$n/24" dev eth1
        ip -n "$P$node" link set eth1 up
        EVAL_ADDR[$node]="10.77.1.$n"
    done
}

declare -A ADDR EVAL_ADDR
run_config() { # rate config
    local rate=$1 config=$2 servers="" eval_servers="" listen train_cfg=() parts mods
    IFS=: read -ra parts <<< "$config"
    case "${parts[0]}" in
        nocache) train_cfg+=(--cache 0); mods=("${parts[@]:1}") ;;
        cache) [[ ${parts[1]:-} =~ ^[0-9]+$ ]] || die "config $config: cache:BOUND needs a number"
            push=${parts[1]}
            for mod in "${parts[@]:2}"; do
                [[ $mod =~ ^push([0-9]+)$ ]] && push=${BASH_REMATCH[1]}
            done
            train_cfg+=(--cache 0.1 --pull-bound "${parts[1]}" --push-bound "$push")
            mods=("${parts[@]:2}") ;;
        *) die "unknown config $config (cache:BOUND or nocache, then :prefetch, :warmupN and/or :push-whole or :share-weighted)" ;;
    esac
    for mod in "${mods[@]}"; do
        case "$mod" in
            prefetch) train_cfg+=(--prefetch) ;;
            warmup[0-9]*) [[ ${mod#warmup} =~ ^[0-9]+$ ]] || die "config $config: warmupN needs a number"
                train_cfg+=(--warmup-batches "${mod#warmup}") ;;
            push-whole|share-weighted) train_cfg+=(--update-rule "$mod") ;;
            push[0-9]*) [[ ${parts[0]} == cache ]] || die "config $config: pushN needs a cache" ;;
            *) die "config $config: unknown modifier $mod (prefetch, warmupN, pushN, push-whole, share-weighted)" ;;
        esac
    done
    for ((s = 0; s < SHARDS; s++)); do
        # With the measurement network, on both of the namespace's links.
        listen="${ADDR[s$s]}"; [[ $EVAL_NET == no ]] || listen=0.0.0.0
        ip netns exec "$P""s$s" "$HETKV" serve --listen "$listen:7070" --shard "$s" --shards "$SHARDS" \
            2> "$OUT/$rate-$config-daemon$s.log" &
        DAEMONS+=($!)
        servers+="${servers:+,}${ADDR[s$s]}:7070"
        [[ $EVAL_NET == no ]] || eval_servers+="${eval_servers:+,}${EVAL_ADDR[s$s]}:7070"
    done
    [[ -z $eval_servers ]] || train_cfg+=(--eval-servers "$eval_servers")
    for _ in $(seq 100); do
        ip netns exec "${P}c" "$HETKV" stats --cluster "$servers" >/dev/null 2>&1 && break
        sleep 0.1
    done
    ip netns exec "${P}c" "$HETKV" stats --cluster "$servers" >/dev/null || die "the daemons did not come up"
    echo "== $rate, $config: $SHARDS daemons, $WORKERS worker processes, coordinator in its own namespace" >&2
    # In the background, so that a signal to this script runs its traps at once (bash defers them
    # while a foreground command runs); the cleanup kills everything left in the namespaces.
    ip netns exec "${P}c" "$BENCH" train --workers "$WORKERS" --servers "$servers" \
        --spawn-prefix "ip netns exec ${P}w{i}" "${train_cfg[@]}" "${TRAIN_ARGS[@]}" \
        --json "$OUT/$rate-$config.json" &
    wait $! || die "training failed ($rate, $config)"
    for pid in "${DAEMONS[@]}"; do kill "$pid"; wait "$pid" || true; done
    DAEMONS=()
}

for rate in $RATES; do
    make_cluster "$rate"
    for config in $CONFIGS; do run_config "$rate" "$config"; done
    cleanup
done

echo "$NETEM" > "$OUT/netem"
summary
