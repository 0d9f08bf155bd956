"""Settings, read from the environment (django-environ); one code path for every stage."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import environ

from config.logs import logging_config
from config.production import INSECURE_SECRET_KEY, refuse_default_secrets

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default=INSECURE_SECRET_KEY)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000")

INSTALLED_APPS = [
    "console.apps.ConsoleAdminConfig",  # django.contrib.admin, with the console's site
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "simple_history",
    "tenants",
    "providers",
    "quotas",
    "ledger",
    "alerts",
    "console",
    "control",
]

# Session, authentication, messages and history: Django's and simple-history's, passed over
# for the bearer-key API under /api/v1/ (quotas/api/middleware.py), which uses none of them.
MIDDLEWARE = [
    "config.middleware.OpsMiddleware",  # /healthz, /readyz, /metrics: before any other
    "config.middleware.RequestIdMiddleware",
    "quotas.api.access.AccessLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "quotas.api.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "quotas.api.middleware.AuthenticationMiddleware",
    "quotas.api.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "quotas.api.middleware.HistoryRequestMiddleware",
]

ROOT_URLCONF = "config.urls"
WSGI_APPLICATION = "config.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],  # every template lives in its app
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {
    "default": env.db("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}"),
}
DATABASES["default"].setdefault("CONN_MAX_AGE", env.int("CONN_MAX_AGE", default=60))
if DATABASES["default"]["ENGINE"].endswith("postgresql"):
    # without it a database that drops packets holds a request for minutes (the kernel's
    # connect retries); a URL's own ?connect_timeout= wins
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env.int("DATABASE_CONNECT_TIMEOUT", default=5)
    )
if DATABASES["default"]["ENGINE"].endswith("sqlite3"):
    # The demo's web app, Celery worker and beat share one SQLite file. WAL lets readers run
    # beside the one writer; BEGIN IMMEDIATE makes a transaction that reads and then writes
    # (the ledger's rollups) queue for the write lock up to `timeout` seconds, instead of
    # failing at once with "database is locked" (docs/ledger.md#sqlite).
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL",
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
        }
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="redis://127.0.0.1:6379/0")
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "cache",
    }
}

# Owners get the admin permissions their ownership implies (console/access.py).
AUTHENTICATION_BACKENDS = [
    "django.contrib.auth.backends.ModelBackend",
    "console.access.OwnerPermissions",
]
LOGIN_URL = "admin:login"  # the only login page (linked from the password reset's last page)
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = env.path("STATIC_ROOT", default=str(VAR_DIR / "static"))
# Front-end libraries installed by npm from package-lock.json (bin/_env.sh: ensure_static),
# served by the project itself: {% static 'vendor/chartjs/chart.umd.js' %}.
STATICFILES_DIRS = [("vendor/chartjs", BASE_DIR / "node_modules" / "chart.js" / "dist")]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}

EMAIL_CONFIG = env.email_url("EMAIL_URL", default="consolemail://")
vars().update(EMAIL_CONFIG)
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="quota@localhost")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["quotas.api.auth.ApiKeyAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["quotas.api.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["quotas.api.parsers.JSONParser"],
    "DEFAULT_CONTENT_NEGOTIATION_CLASS": "quotas.api.negotiation.OneRendererNegotiation",
    "EXCEPTION_HANDLER": "quotas.api.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": None,
}

SPECTACULAR_SETTINGS = {
    "TITLE": "LLM quota API",
    "DESCRIPTION": "Reserve worst-case tokens before an LLM call, commit actual usage after.",
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    # the docs page works offline: Redoc is served from this project's static files
    "REDOC_DIST": "SIDECAR",
    # the answers' components (quotas/api/responses.py): enums named for what they list
    "ENUM_NAME_OVERRIDES": {
        "ReservationStatus": "quotas.api.responses.RESERVATION_STATUSES",
        "ErrorCode": "quotas.api.responses.ERROR_CODES",
        "Priority": "quotas.api.responses.PRIORITIES",
    },
    "ENUM_GENERATE_CHOICE_DESCRIPTION": False,
    "ENUM_ADD_EXPLICIT_BLANK_NULL_CHOICE": False,
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "quotas.api.responses.request_rules",
    ],
}

RATELIMIT_USE_CACHE = "default"
RATELIMIT_FAIL_OPEN = True  # a throttle that cannot count lets requests through to auth
RATELIMIT_IP_META_KEY = env.str("RATELIMIT_IP_META_KEY", default="REMOTE_ADDR")

CELERY_BROKER_URL = env.str("CELERY_BROKER_URL", default=REDIS_URL)
CELERY_RESULT_BACKEND = env.str("CELERY_RESULT_BACKEND", default=REDIS_URL)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TIMEZONE = "UTC"
# A restarted or failed-over Redis must not end the worker or beat: they reconnect, at start
# too, for as long as it takes (Celery's default gives up after 100 attempts), and kombu's
# health checks and socket timeouts notice a connection that died without being closed.
CELERY_BROKER_CONNECTION_RETRY = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BROKER_CONNECTION_MAX_RETRIES = None
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "health_check_interval": 10,
    "socket_timeout": 10,  # above kombu's 1 s BRPOP, so only a dead connection times out
    "socket_connect_timeout": 5,
    "socket_keepalive": True,
    "retry_on_timeout": True,
}
CELERY_REDIS_BACKEND_HEALTH_CHECK_INTERVAL = 10
CELERY_REDIS_SOCKET_KEEPALIVE = True
CELERY_RESULT_BACKEND_ALWAYS_RETRY = True

# The engine's own settings: plain values handed to the engine by the layer above it.
QUOTA_HASH_TAG = env.str("QUOTA_HASH_TAG", default="quota")
# A Redis Cluster for the quota state ("host:port,host:port" seeds; empty: REDIS_URL's Redis).
# The cache and Celery's broker stay on REDIS_URL. docs/scale.md says how the state is split.
QUOTA_REDIS_CLUSTER_NODES = env.list("QUOTA_REDIS_CLUSTER_NODES", default=[])
# Partitions of the quota state: a tenant's decisions live on one (tenant id mod count); a
# limit that tenants share is split into allotments, one per partition, that move toward
# demand every QUOTA_REBALANCE_SECONDS. 1 (one Redis) or 12 (a cluster) unless set.
QUOTA_PARTITIONS = env.int("QUOTA_PARTITIONS", default=12 if QUOTA_REDIS_CLUSTER_NODES else 1)
QUOTA_REBALANCE_SECONDS = env.float("QUOTA_REBALANCE_SECONDS", default=1.0)
QUOTA_API_KEY_PEPPER = env.str("QUOTA_API_KEY_PEPPER", default=SECRET_KEY)
# An hour: a late commit (past its expiry) or a replay has one longest TTL to arrive; see
# docs/engine.md for the memory it costs.
QUOTA_LEASE_RETENTION_SECONDS = env.int("QUOTA_LEASE_RETENTION_SECONDS", default=3600)
# 0: the usage stream is trimmed only by the ledger, below what it has acknowledged. A
# positive cap bounds Redis memory when no ledger runs, at the price of losing events.
QUOTA_STREAM_MAXLEN = env.int("QUOTA_STREAM_MAXLEN", default=0)
LOGGING = logging_config(
    level=env.str("LOG_LEVEL", default="INFO"), fmt=env.str("LOG_FORMAT", default="text")
)

# -- Operating it (docs/operations.md) -------------------------------------------------------
# Production by environment alone: DEBUG=false declares it, and then the secrets must be set.
refuse_default_secrets(
    production="DEBUG" in env.ENVIRON and not DEBUG,
    secret_key=SECRET_KEY,
    pepper=QUOTA_API_KEY_PEPPER,
)
# Behind a TLS-terminating proxy: e.g. SECURE_PROXY_SSL_HEADER=HTTP_X_FORWARDED_PROTO,https
# (the proxy must set that header itself, never pass on the client's).
SECURE_PROXY_SSL_HEADER = env.tuple("SECURE_PROXY_SSL_HEADER", default=None)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
SILENCED_SYSTEM_CHECKS = env.list("SILENCED_SYSTEM_CHECKS", default=[])

# /metrics: to a bearer token and/or from these networks (CIDRs); with neither, only in DEBUG.
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
METRICS_ALLOWED_NETWORKS = env.list("METRICS_ALLOWED_NETWORKS", default=[])
for _network in METRICS_ALLOWED_NETWORKS:
    ipaddress.ip_network(_network, strict=False)  # a typo fails at start, not at each scrape
# /readyz answers 503 while the oldest usage event not yet in the ledger is older (0: never)
READYZ_MAX_LEDGER_LAG_SECONDS = env.float("READYZ_MAX_LEDGER_LAG_SECONDS", default=300.0)
