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

ensure_venv() {
  if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt .venv/.installed ]; then
    ensure_python
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -e '.[dev]'
    .venv/bin/pip install --quiet -e ./sdk
    touch .venv/.installed
  fi
  mkdir -p var
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
