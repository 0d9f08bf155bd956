from tests.fixtures import connections_kept, redis_db, reserve, world

__all__ = ["connections_kept", "redis_db", "reserve", "world"]
