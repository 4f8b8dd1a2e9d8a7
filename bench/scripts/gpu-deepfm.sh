#!/usr/bin/env bash
# DeepFM with rows of 128 on one GPU host: two hetkv daemons on the host, the trainer
# (examples/python/deepfm.py) through a cache of 10% at bound 100 and without one, over TCP and
# shared memory, against the same model with torch.nn.Embedding wholly on the GPU.
#
#   bash bench/scripts/gpu-deepfm.sh BIN_DIR OUT_DIR
#
# BIN_DIR holds release builds made elsewhere (the GPU host needs no cargo): `hetkv`,
# `hetkv-bench` and the hetkv wheel (maturin build --release -m client/python/Cargo.toml). The
# host's python3 must have numpy and torch with CUDA. SAMPLES (800000), DEVICE (cuda), PY
# (python3) and RUNS (which runs, default all: torch-gpu cache-shm cache-tcp nocache-tcp
# nocache-shm cache-1g nocache-1g; the last two over an emulated 1 Gbit/s link) can be set in the
# environment. Each run's JSON report lands in OUT_DIR.
set -u
bin=$(cd "$1" && pwd); out=$(mkdir -p "$2" && cd "$2" && pwd)
example=$(cd "$(dirname "$0")/../.." && pwd)/examples/python/deepfm.py
py=${PY:-python3}
nproc; nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
$py -c "import numpy, torch; print('numpy', numpy.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
lib=$(mktemp -d)
$py -m pip install --quiet --no-deps --no-index --target "$lib" "$bin"/hetkv-*.whl
export PYTHONPATH=$lib
$py -c "import hetkv, hetkv.torch; print('hetkv', hetkv.__version__)" || exit 1
data=$(mktemp -d)
"$bin/hetkv-bench" criteo --samples "${SAMPLES:-800000}" --tsv "$data/c.tsv" --json "$data/c.json" | tail -1
cp "$data/c.json" "$out/criteo.json"
for i in 0 1; do
  RUST_LOG=warn "$bin/hetkv" serve --listen "127.0.0.1:700$i" --shard $i --shards 2 --shm-dir /dev/shm \
    2>"$out/daemon$i.log" &
done
trap 'kill $(jobs -p) 2>/dev/null' EXIT
sleep 1
common=(--tsv "$data/c.tsv" --report "$data/c.json" --npz "$data/c.npz" --device "${DEVICE:-cuda}"
  --dim 127 --batch 128 --eval-every 5 --target-auc 0.80)
cluster=(--cluster 127.0.0.1:7000,127.0.0.1:7001)
runs=${RUNS:-torch-gpu cache-shm cache-tcp nocache-tcp nocache-shm cache-1g nocache-1g}
run() {
  local name=$1; shift
  case " $runs " in *" $name "*) ;; *) return 0 ;; esac
  echo "== $name"
  timeout 170 $py "$example" "${common[@]}" --json "$out/$name.json" "$@" 2>&1 | grep -v "UserWarning\|sparse_coo_tensor" | tail -2
}
run torch-gpu --torch-embedding
run cache-shm "${cluster[@]}" --transport shm --table cs --cache 0.1 --bound 100
run cache-tcp "${cluster[@]}" --transport tcp --table ct --cache 0.1 --bound 100
run nocache-tcp "${cluster[@]}" --transport tcp --table nt --cache 0 --bound 0
run nocache-shm "${cluster[@]}" --transport shm --table ns --cache 0 --bound 0
run cache-1g "${cluster[@]}" --transport tcp --table c1 --cache 0.1 --bound 100 --emulated-link-gbps 1
run nocache-1g "${cluster[@]}" --transport tcp --table n1 --cache 0 --bound 0 --emulated-link-gbps 1
