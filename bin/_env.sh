# Shared helpers for bin/run, bin/test and .ci/run (sourced, not executed).

# Fails with a clear word when python3 is older than the project needs, and installs Debian's
# venv module where it is missing (root only), so a fresh machine needs no manual step.
ensure_python() {
  if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "Python 3.11 or newer is needed as python3 (found: $(python3 --version 2>&1))." >&2
    return 1
  fi
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
    else
      echo "python3 has no venv module: install python3-venv." >&2
      return 1
    fi
  fi
}

# Installs the project, its dev extras and the SDK at the versions in constraints.txt, again
# whenever pyproject.toml, the SDK's or constraints.txt changed since the last install.
ensure_venv() {
  if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt .venv/.installed ] \
    || [ sdk/pyproject.toml -nt .venv/.installed ] || [ constraints.txt -nt .venv/.installed ]; then
    ensure_python
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -c constraints.txt -e '.[dev]' -e ./sdk
    touch .venv/.installed
  fi
  mkdir -p var/static  # STATIC_ROOT: whitenoise warns on every request while it is missing
  ensure_static
}

# The front-end libraries the admin serves from its own static files (Chart.js, no CDN):
# installed by npm from package-lock.json when missing or when the lock file changed.
ensure_static() {
  if [ -f node_modules/chart.js/package.json ] && [ ! package-lock.json -nt node_modules/.installed ]; then
    return 0
  fi
  if ! command -v npm >/dev/null 2>&1; then
    echo "npm is needed to install the admin's static libraries (Chart.js) from package-lock.json:" >&2
    echo "install Node.js 20 or newer with npm, then run this again." >&2
    return 1
  fi
  npm ci --omit=dev --no-audit --no-fund --loglevel=error >/dev/null
  touch node_modules/.installed
}

# Debian's chromium for the browser tests (tests/browser), driven by Playwright; Playwright's
# own browser downloads are never used. Installed when missing and we are root with apt-get;
# when it still cannot be had, the browser tests skip with the reason exported here.
ensure_browser() {
  local chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
  [ -x "$chromium" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Debian's chromium for the browser tests" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq chromium >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || true
  fi
  if [ ! -x "$chromium" ]; then
    export BROWSER_UNAVAILABLE="$chromium is missing and could not be installed (needs root and apt-get, or set CHROMIUM_PATH)"
    echo "Browser tests will be skipped: $BROWSER_UNAVAILABLE" >&2
  fi
  return 0
}

redis_reachable() {
  .venv/bin/python - "${REDIS_URL:-redis://127.0.0.1:6379/0}" <<'PY' >/dev/null 2>&1
import sys, redis
redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1).ping()
PY
}

ensure_redis() {
  redis_reachable && return 0
  if ! command -v redis-server >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
    else
      echo "Redis is not reachable at ${REDIS_URL:-redis://127.0.0.1:6379/0} and cannot be installed here." >&2
      return 1
    fi
  fi
  mkdir -p var/redis
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$PWD/var/redis" --logfile "$PWD/var/redis/redis.log"
  for _ in $(seq 50); do redis_reachable && return 0; sleep 0.1; done
  echo "Redis did not come up; see var/redis/redis.log" >&2
  return 1
}

# redis-server and redis-cli, which bin/test's Redis Cluster pass starts its nodes and creates
# the cluster with (both come with Debian's redis-server): installed when missing as root.
ensure_redis_cluster_tools() {
  command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq redis-server >/dev/null
  else
    echo "The Redis Cluster pass needs redis-server and redis-cli: install Debian's redis-server." >&2
    return 1
  fi
}

# Runs a command again whenever it exits, so one crashed process does not take bin/run's
# others down. The pause before a restart doubles from 1 s up to 30 s while the command keeps
# exiting soon after it started (a run of SUPERVISE_HEALTHY_SECONDS, 60, starts it over);
# after SUPERVISE_GIVE_UP (5) such quick exits in a row no restart will help, and it returns.
supervise() {
  local name="$1" delay=1 quick=0 status started
  shift
  while true; do
    started=$SECONDS
    status=0
    "$@" </dev/null || status=$?
    if ((SECONDS - started >= ${SUPERVISE_HEALTHY_SECONDS:-60})); then
      delay=1 quick=0
    else
      quick=$((quick + 1))
    fi
    if ((quick >= ${SUPERVISE_GIVE_UP:-5})); then
      echo "bin/run: $name exited $quick times in a row soon after starting (status $status); giving up" >&2
      return $((status == 0 ? 1 : status))
    fi
    echo "bin/run: $name exited (status $status); restarting it in $delay s" >&2
    sleep "$delay"
    delay=$((delay * 2 > 30 ? 30 : delay * 2))
  done
}
