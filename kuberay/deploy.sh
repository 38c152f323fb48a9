#!/usr/bin/env bash
# Deploy, inspect or roll back one environment of the speech service on Kubernetes.
#
#   kuberay/deploy.sh ENV deploy     # render overlays/ENV, apply it, wait for the RayService
#   kuberay/deploy.sh ENV status     # RayService, pods, jobs backlog hints
#   kuberay/deploy.sh ENV rollback   # re-apply the release before the current one
#
# ENV is a folder under kuberay/overlays (staging, production). DRY_RUN=1 prints every
# kubectl command that would change the cluster instead of running it, and needs no cluster
# for `deploy` (the rendered manifests are printed too). Each deploy keeps the manifests it
# applied in the ConfigMap `speech-release-current` and the ones before in
# `speech-release-previous`; rollback swaps back to the latter.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KUBECTL="${KUBECTL:-kubectl}"
DRY_RUN="${DRY_RUN:-0}"
WAIT_TIMEOUT="${WAIT_TIMEOUT:-20m}"

usage() {
  local envs=("$HERE"/overlays/*/)
  envs=("${envs[@]%/}")
  echo "usage: $0 ENV deploy|status|rollback   (ENV: ${envs[*]##*/})" >&2
  exit 2
}

log() { echo "[deploy.sh] $*" >&2; }

# Run a command that changes the cluster, or only print it under DRY_RUN=1.
mutate() {
  if [[ "$DRY_RUN" == "1" ]]; then
    echo "DRY-RUN: $*"
  else
    "$@"
  fi
}

[[ $# -eq 2 ]] || usage
ENV_NAME="$1"
ACTION="$2"
OVERLAY="$HERE/overlays/$ENV_NAME"
[[ -d "$OVERLAY" ]] || { log "unknown environment '$ENV_NAME'"; usage; }
NAMESPACE="speech-$ENV_NAME"

command -v "$KUBECTL" >/dev/null || { log "kubectl not found (set KUBECTL)"; exit 1; }

render() { "$KUBECTL" kustomize "$OVERLAY"; }

# The generated files must be current before anything reaches a cluster.
check_generated() {
  local python="${PYTHON:-python3}"
  "$python" "$HERE/render_serve_config.py" --check
  "$python" "$HERE/render_prometheus_rule.py" --check
}

save_release() {  # $1 = ConfigMap name, $2 = file with the manifests
  "$KUBECTL" -n "$NAMESPACE" create configmap "$1" --from-file=manifests.yaml="$2" \
    --dry-run=client -o yaml | mutate "$KUBECTL" -n "$NAMESPACE" apply -f -
}

wait_ready() {
  mutate "$KUBECTL" -n "$NAMESPACE" wait rayservice/speech --for=condition=Ready --timeout="$WAIT_TIMEOUT"
}

deploy() {
  check_generated
  local manifests
  manifests="$(mktemp)"
  trap 'rm -f "$manifests"' RETURN
  render >"$manifests"
  if [[ "$DRY_RUN" == "1" ]]; then
    cat "$manifests"
    mutate "$KUBECTL" apply -f "$manifests"
    mutate "$KUBECTL" -n "$NAMESPACE" wait rayservice/speech --for=condition=Ready --timeout="$WAIT_TIMEOUT"
    return
  fi
  "$KUBECTL" get namespace "$NAMESPACE" >/dev/null 2>&1 || "$KUBECTL" create namespace "$NAMESPACE"
  "$KUBECTL" -n "$NAMESPACE" get secret speech-secrets >/dev/null 2>&1 \
    || { log "secret speech-secrets missing in $NAMESPACE: see kuberay/base/secret.template.yaml"; exit 1; }
  local previous
  previous="$(mktemp)"
  if "$KUBECTL" -n "$NAMESPACE" get configmap speech-release-current \
      -o jsonpath='{.data.manifests\.yaml}' >"$previous" 2>/dev/null && [[ -s "$previous" ]]; then
    save_release speech-release-previous "$previous"
  fi
  rm -f "$previous"
  log "applying $ENV_NAME to namespace $NAMESPACE"
  "$KUBECTL" apply -f "$manifests"
  save_release speech-release-current "$manifests"
  wait_ready
  log "RayService ready"
}

status() {
  "$KUBECTL" -n "$NAMESPACE" get rayservice speech -o wide || true
  "$KUBECTL" -n "$NAMESPACE" get raycluster,pods -o wide || true
  "$KUBECTL" -n "$NAMESPACE" get rayjobs || true
  echo "Serve applications:"
  "$KUBECTL" -n "$NAMESPACE" get rayservice speech \
    -o jsonpath='{range .status.activeServiceStatus.applicationStatuses.*}{.status}{"\n"}{end}' || true
}

rollback() {
  local previous
  previous="$(mktemp)"
  trap 'rm -f "$previous"' RETURN
  "$KUBECTL" -n "$NAMESPACE" get configmap speech-release-previous \
    -o jsonpath='{.data.manifests\.yaml}' >"$previous" 2>/dev/null || true
  if [[ ! -s "$previous" ]]; then
    log "no previous release recorded in $NAMESPACE (configmap speech-release-previous)"
    exit 1
  fi
  local current
  current="$(mktemp)"
  "$KUBECTL" -n "$NAMESPACE" get configmap speech-release-current \
    -o jsonpath='{.data.manifests\.yaml}' >"$current" 2>/dev/null || true
  log "rolling $NAMESPACE back to the previous release"
  mutate "$KUBECTL" apply -f "$previous"
  save_release speech-release-current "$previous"
  if [[ -s "$current" ]]; then save_release speech-release-previous "$current"; fi
  rm -f "$current"
  wait_ready
}

case "$ACTION" in
  deploy) deploy ;;
  status) status ;;
  rollback) rollback ;;
  *) usage ;;
esac
