"""The one Redis client of the process, and the config version that invalidates caches."""

from __future__ import annotations

from functools import lru_cache

import redis
from django.conf import settings


@lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    return redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=2.0,
        socket_connect_timeout=1.0,
        health_check_interval=30,
    )


def config_version_key() -> str:
    return f"q:{{{settings.QUOTA_HASH_TAG}}}:config_version"


def config_version_bump() -> None:
    get_redis().incr(config_version_key())


def config_version_read() -> int:
    return int(get_redis().get(config_version_key()) or 0)
