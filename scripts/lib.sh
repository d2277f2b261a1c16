# Shared by scripts/*: sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

say() { printf '==> %s\n' "$*" >&2; }

# A Python >= 3.11 to build the virtualenv with.
find_python() {
  for py in "${PYTHON:-}" python3.13 python3.12 python3.11 python3; do
    [ -n "$py" ] || continue
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$py"; return 0
    fi
  done
  echo "sealstream needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  return 1
}

# .venv with the project and its dev tools, reinstalled when pyproject.toml changes.
setup_venv() {
  local stamp=.venv/.sealstream-installed
  if [ ! -x .venv/bin/python ]; then
    say "creating .venv"
    "$(find_python)" -m venv .venv
  fi
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing sealstream and its dev tools into .venv"
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -e ".[dev]"
    touch "$stamp"
  fi
}

# redis-server on PATH: installed with apt when we are root on Debian/Ubuntu.
ensure_redis_server() {
  command -v redis-server >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing redis-server with apt"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
    return 0
  fi
  cat >&2 <<'MSG'
redis-server is not installed. Install it, then run this again:
  Debian/Ubuntu: sudo apt-get install redis-server
  macOS:         brew install redis
  or set SEALSTREAM_REDIS_URL to a Redis you may use.
MSG
  return 1
}

# Node.js + npm, and the npm packages of the JavaScript client (clients/js) and of the
# interop client (tests/interop, which uses clients/js).
ensure_node_deps() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing nodejs and npm with apt"
      apt_update_once
      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
    elif [ -n "${CI:-}" ]; then
      echo "node/npm not found and cannot be installed here: CI needs them for the JS client" >&2
      return 1
    else
      say "node/npm not found: the JS client and interop tests will be skipped (in CI they fail)"
      return 0
    fi
  fi
  local dir
  for dir in clients/js tests/interop; do
    if [ ! -d "$dir/node_modules" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules" ]; then
      say "installing the npm packages of $dir"
      (cd "$dir" && npm ci --silent --no-audit --no-fund)
      touch "$dir/node_modules"
    fi
  done
}

# Debian's chromium, for the browser test of the gateway's demo page.
ensure_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing chromium with apt (the demo page's browser test)"
    apt_update_once
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    return 0
  fi
  if [ -n "${CI:-}" ]; then
    echo "chromium not found and cannot be installed here: CI needs it for the browser test" >&2
    return 1
  fi
  say "chromium not found: the browser test will be skipped (in CI it fails)"
}

APT_UPDATED=
apt_update_once() {
  [ -n "$APT_UPDATED" ] && return 0
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  APT_UPDATED=1
}
