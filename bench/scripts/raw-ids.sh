#!/usr/bin/env bash
# DeepFM on raw 64-bit ids (a dynamic table at the fixed table's memory) against dense keys (a
# fixed table of every id), side by side: each seed of SEEDS (default "1 2 3"), caches holding the
# same number of rows.
#   [SEEDS="1 2 3 4 5"] bash bench/scripts/raw-ids.sh BIN OUT [extra train flags...]
# BIN is a release `hetkv-bench`; each run's report goes to OUT/{fixed,raw}-SEED.json, and a
# summary table (AUC, logloss, hit rate, embedding bytes a sample) is printed, then the mean AUC
# and logloss of each kind over the seeds and the raw run's AUC less the fixed run's, seed by seed.
set -euo pipefail
bin=${1:?hetkv-bench binary}
out=${2:?output directory}
shift 2
mkdir -p "$out"
# At scale 0.01 the fixed table holds 337,658 ids and the dynamic table, at the same memory,
# 194,102 rows (printed in each raw report's settings.raw_capacity): a raw cache of 17.4% of its
# table holds the fixed cache's 10% of its table, 33,766 rows.
seeds=${SEEDS:-1 2 3}
for seed in $seeds; do
    "$bin" train --model deepfm --seed "$seed" --cache 0.1 --json "$out/fixed-$seed.json" "$@"
    "$bin" train --model deepfm --seed "$seed" --cache 0.17396 --raw-ids --json "$out/raw-$seed.json" "$@"
done
python3 - "$out" $seeds <<'PY'
import json, statistics, sys
out, seeds = sys.argv[1], sys.argv[2:]
print("| seed | keys | table rows | AUC | logloss | hit rate | embedding bytes a sample |")
print("|---|---|---:|---:|---:|---:|---:|")
runs = {}
for seed in seeds:
    for kind in ("fixed", "raw"):
        r = runs[kind, seed] = json.load(open(f"{out}/{kind}-{seed}.json"))
        c = r["cache"]
        hits = c["hits"] / max(1, c["hits"] + c["misses"])
        rows = r["settings"]["raw_capacity"] if kind == "raw" else 337658
        print(f"| {seed} | {kind} | {rows:,} | {r['auc']:.4f} | {r['logloss']:.4f} | "
              f"{100 * hits:.1f}% | {r['embedding_bytes_per_sample']:.1f} |")
for kind in ("fixed", "raw"):
    auc = [runs[kind, s]["auc"] for s in seeds]
    loss = [runs[kind, s]["logloss"] for s in seeds]
    print(f"{kind}: mean AUC {statistics.mean(auc):.4f}, mean logloss {statistics.mean(loss):.4f} "
          f"over {len(seeds)} seeds")
print("raw less fixed, AUC by seed:",
      " ".join(f"{runs['raw', s]['auc'] - runs['fixed', s]['auc']:+.4f}" for s in seeds))
PY
