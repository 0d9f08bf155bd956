from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from quotas.store import get_redis


@pytest.fixture(autouse=True)
def redis_db() -> Iterator[redis.Redis]:
    client = get_redis()
    index = client.connection_pool.connection_kwargs.get("db", 0)
    assert index != 0, f"tests must not use Redis database 0 ({settings.REDIS_URL})"
    client.flushdb()
    yield client
    client.flushdb()
