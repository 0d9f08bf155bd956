from tests.fixtures import redis_db, reserve, world

__all__ = ["redis_db", "reserve", "world"]
