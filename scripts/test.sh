#!/usr/bin/env bash
# The README's test command: installs what the tests need on a fresh machine (Debian packages and
# the rust components), then runs the workspace's tests. `.ci/run` calls exactly this script.
#
#   bash scripts/test.sh            # every test of the workspace
#   bash scripts/test.sh -p NAME    # extra arguments go to `cargo test`
#
# Needs root (or sudo) only when a package is missing (`store/tests/cgroup.rs` makes a memory
# cgroup where it can; CI runs it in the soft-RoCE VM). Fails loudly on any missing piece.
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null 2>&1; then sudo "$@"; else
    echo "scripts/test.sh: '$*' needs root, and there is no sudo" >&2
    exit 1
  fi
}

# What the tests use beyond cargo:
# - kill(1) (procps): the daemon tests signal the daemon;
# - redis-server: `hetkv-bench compare` is tested against a real Redis;
# - libfaketime: daemons run with their wall clocks a year off (nothing may depend on clocks
#   agreeing);
# - fonts-dejavu-core: the plots draw their labels with DejaVu Sans;
# - python3 with pip: the MovieLens test fetches its data set from PyPI;
# - python3's venv with numpy and safetensors: the export test loads an exported table in Python.
need=()
if [ ! -x /usr/bin/kill ] && [ ! -x /bin/kill ]; then need+=(procps); fi
if ! command -v redis-server >/dev/null 2>&1; then need+=(redis-server); fi
if ! ls /usr/lib/*/faketime/libfaketime.so.1 >/dev/null 2>&1; then need+=(libfaketime); fi
if [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then need+=(fonts-dejavu-core); fi
if ! command -v python3 >/dev/null 2>&1; then need+=(python3 python3-pip);
elif ! python3 -m pip --version >/dev/null 2>&1; then need+=(python3-pip); fi
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
  need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "scripts/test.sh: installing ${need[*]}"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}"
fi
redis-server --version
ls /usr/lib/*/faketime/libfaketime.so.1
python3 -m pip --version

# A virtual environment of the tests' own, outside the clone so that torch (large) is installed
# once per machine: numpy and safetensors (the export test loads a table in Python), and for the
# Python package's suites pytest, maturin, torch, Ray (with Ray Train: hetkv.ray's tests run a
# local Ray instance) and TorchRec (hetkv's collections are tested under TorchRec's own classes).
# TorchRec pins its torch through FBGEMM: torchrec 1.9.2 runs on fbgemm-gpu 1.9.0, built for torch
# 2.14; its CPU build (fbgemm-gpu-cpu) goes in, and torchrec without its dependency on the CUDA
# build (the two share one module name; the CUDA build does not load without a GPU driver).
home=${HOME:-$(getent passwd "$(id -u)" | cut -d: -f6)}
venv=${HETKV_TEST_VENV:-${XDG_CACHE_HOME:-$home/.cache}/hetkv/test-venv}
if [ ! -x "$venv/bin/python" ]; then mkdir -p "$(dirname "$venv")"; python3 -m venv "$venv"; fi
if ! "$venv/bin/python" -c 'import numpy, safetensors, pytest, maturin, torch, ray.train.torch, torchrec' >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install --quiet numpy safetensors pytest maturin "torch==2.14.1" \
    "ray[train]==2.60.0" "fbgemm-gpu-cpu==1.9.0" pyre-extensions tensordict torchmetrics tqdm
  "$venv/bin/python" -m pip install --quiet --no-deps "torchrec==1.9.2"
fi
"$venv/bin/python" -c 'import numpy, safetensors, torch, torchrec; print("python test env: numpy", numpy.__version__, "safetensors", safetensors.__version__, "torch", torch.__version__, "torchrec", torchrec.__version__)'
export HETKV_REQUIRE_TORCHREC=1
export HETKV_PYTHON="$venv/bin/python"
# Ray's local instances in the tests report no usage statistics.
export RAY_USAGE_STATS_ENABLED=0

cargo test --workspace "$@"

# The Python package, built from source as a user would (a wheel of ./client/python, with the
# venv's maturin; a debug build, which is quicker to make) and installed, then its pytest suites
# against the daemon binary the cargo tests built; one installs the wheel into a fresh venv and
# runs its `hetkv serve`.
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
PATH="$venv/bin:$PATH" MATURIN_PEP517_ARGS="--profile dev" "$venv/bin/python" -m pip wheel --quiet \
  --no-deps --no-build-isolation --wheel-dir "$wheels" ./client/python
wheel=$(ls "$wheels"/hetkv-*.whl)
"$venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$wheel"
HETKV_BIN="$PWD/target/debug/hetkv" HETKV_WHEEL="$wheel" "$venv/bin/python" -m pytest -q client/python/tests

# The Kubernetes manifests, rendered and checked against a pinned schema.
bash scripts/validate-k8s.sh "$venv"
