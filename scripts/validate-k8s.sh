#!/usr/bin/env bash
# Renders the Kubernetes base (deploy/kubernetes/base) with kubectl's kustomize and validates it,
# and the examples, against a pinned Kubernetes schema (kubernetes-validate from PyPI, strict:
# an unknown field fails too). Installs what is missing: kubectl (Debian's kubernetes-client)
# and kubernetes-validate (into the venv given as $1, else a venv of its own). Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

KUBERNETES_VERSION=1.31.0
VALIDATE_VERSION=1.37.0

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
if ! command -v kubectl >/dev/null 2>&1; then
  echo "validate-k8s: installing kubernetes-client (kubectl)"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends kubernetes-client
fi
venv=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/hetkv/k8s-venv}
if [ ! -x "$venv/bin/python" ]; then python3 -m venv "$venv"; fi
"$venv/bin/python" -c "import kubernetes_validate" >/dev/null 2>&1 ||
  "$venv/bin/python" -m pip install --quiet "kubernetes-validate==$VALIDATE_VERSION"

rendered=$(mktemp --suffix=.yaml)
jobs=$(mktemp --suffix=.yaml)
trap 'rm -f "$rendered" "$jobs"' EXIT
kubectl kustomize deploy/kubernetes/base > "$rendered"
kinds=$(grep -c '^kind:' "$rendered")
# JobSets are a custom resource: their own fields are checked by name, their Job templates as
# the Jobs they make.
"$venv/bin/python" scripts/validate-jobset.py "$jobs" deploy/kubernetes/examples/jobset/*.yaml
echo "validate-k8s: the base renders to $kinds objects; validating against Kubernetes $KUBERNETES_VERSION"
"$venv/bin/kubernetes-validate" --strict --kubernetes-version "$KUBERNETES_VERSION" \
  "$rendered" deploy/kubernetes/examples/*.yaml "$jobs"
