#!/usr/bin/env bash
# scripts/test.sh: the project's one test command. Installs what the tests need when it
# is missing (redis-server, the publishing examples' Python and Node packages; helm-check.sh
# installs its own tools), then runs every test:
# the Rust workspace (unit, property and integration tests against real redis-server
# processes and real fanout nodes) and the Helm chart / deploy checks.
# the Autobahn|Testsuite conformance runs (scripts/autobahn.sh), and the JavaScript client's
# tests against real nodes, in Node and in Debian's headless Chromium (clients/js).
# Ends with one line "tests: N passed, M failed" and exits non-zero on any failure.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '== %s\n' "$*" >&2; }

apt_updated=""
apt_install() {
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  if [ -z "$apt_updated" ]; then
    $sudo apt-get update -qq && apt_updated=1
  fi
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

need_redis() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  log "redis-server is missing: installing it from Debian's packages"
  apt_install redis-server
  # The tests start their own servers; the packaged service is not needed.
  systemctl disable --now redis-server >/dev/null 2>&1 || true
  command -v redis-server >/dev/null || { echo "tests: 0 passed, 1 failed"; exit 1; }
}

# The TLS test makes a certificate with openssl; the Python tools need venv.
need_tools() {
  command -v openssl >/dev/null || { log "installing openssl"; apt_install openssl; }
  python3 -c 'import ensurepip, venv' 2>/dev/null || { log "installing python3-venv"; apt_install python3-venv; }
}

# crates/server/tests/examples.rs runs examples/python and examples/node against real nodes.
# Their pinned packages go into a venv under the tools cache and examples/node/node_modules,
# reinstalled only when requirements.txt or package-lock.json change. A failed install is
# reported here and fails those tests with instructions; FANOUT_SKIP_EXAMPLES=1 skips both.
need_examples() {
  [ "${FANOUT_SKIP_EXAMPLES:-}" = 1 ] && return 0
  local tools="${FANOUT_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/fanout-tools}"
  local venv="$tools/examples-venv" req="examples/python/requirements.txt" want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ "$(cat "$venv/.requirements" 2>/dev/null)" != "$want" ] ||
    ! "$venv/bin/python" -c 'import msgpack, redis, requests' 2>/dev/null; then
    log "installing the Python examples' packages into $venv"
    rm -rf "$venv"
    if python3 -m venv "$venv" &&
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"; then
      echo "$want" >"$venv/.requirements"
    else
      log "could not install $req (python3 -m venv and pip are needed)"
    fi
  fi
  export FANOUT_EXAMPLES_PYTHON="$venv/bin/python"
  npm_ci examples/node "the Node examples' packages"
}

# npm ci in DIR when its package-lock.json changed since the last install there.
npm_ci() {
  local dir="$1" what="$2" lock
  lock="$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)"
  [ "$(cat "$dir/node_modules/.fanout-lock" 2>/dev/null)" = "$lock" ] && return 0
  log "installing $what (npm ci in $dir)"
  if (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error); then
    echo "$lock" >"$dir/node_modules/.fanout-lock"
  else
    log "npm ci in $dir failed (Node and npm are needed)"
  fi
}

need_node() {
  command -v node >/dev/null && command -v npm >/dev/null && return 0
  log "installing Node and npm from Debian's packages"
  apt_install nodejs npm
}

# clients/js: its pinned dev packages (TypeScript, puppeteer-core, ws) by its lock file,
# and Debian's chromium for the browser test (puppeteer-core never downloads a browser).
need_js() {
  [ -x /usr/bin/chromium ] || { log "installing chromium from Debian's packages"; apt_install chromium; }
  npm_ci clients/js "the JavaScript client's dev packages"
}

need_redis
need_tools
need_node
need_examples
need_js

failed_steps=()
log_dir="$(mktemp -d)"
trap 'rm -rf "$log_dir"' EXIT

log "cargo test --workspace"
cargo test --workspace --locked 2>&1 | tee "$log_dir/cargo.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed_steps+=("cargo test")

# The committed bundle (the demo page serves it) must be what the sources compile to; then
# the client's tests against the fanout binary cargo test just built.
log "JavaScript client: build check and tests (Node, Chromium)"
(
  cd clients/js &&
    npx tsc -p tsconfig.json --outDir "$log_dir/js-dist" &&
    diff -r dist "$log_dir/js-dist" >/dev/null || { echo "clients/js/dist is stale: run npm run build in clients/js"; exit 1; }
  FANOUT_BIN="$ROOT/target/debug/fanout" npm test
) 2>&1 | tee "$log_dir/js.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed_steps+=("js client")
# node:test closes with "# pass N" / "# fail N".
sed -n -e 's/^# pass \([0-9]*\)$/js: \1 passed/p' -e 's/^# fail \([0-9]*\)$/js: \1 failed/p' "$log_dir/js.log" >"$log_dir/js-count.log"

log "helm chart and deploy checks"
scripts/helm-check.sh 2>&1 | tee "$log_dir/helm.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed_steps+=("helm-check")

log "Autobahn|Testsuite conformance"
scripts/autobahn.sh 2>&1 | tee "$log_dir/autobahn.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed_steps+=("autobahn")

sum() { awk -v want="$2" '{ for (i = 1; i < NF; i++) if ($(i+1) ~ "^" want) s += $i } END { print s + 0 }' "$1"; }
count() { # count WORD: passed or failed, over every runner's closing lines
  grep -h -e '^test result:' -e '^helm-check: [0-9]' -e '^autobahn: [0-9]' -e '^js: [0-9]' "$log_dir"/*.log | sum /dev/stdin "$1"
}
passed=$(count passed)
failed=$(count failed)
if [ ${#failed_steps[@]} -gt 0 ] && [ "$failed" -eq 0 ]; then failed=${#failed_steps[@]}; fi
[ ${#failed_steps[@]} -eq 0 ] || log "failed: ${failed_steps[*]}"
echo "tests: $passed passed, $failed failed"
[ ${#failed_steps[@]} -eq 0 ]
