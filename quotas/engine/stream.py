"""The usage stream as a consumer group reads it: read, reclaim, acknowledge.

Each consumer is one process; an entry read by a consumer stays pending until it is
acknowledged, so a consumer that dies leaves its entries for another to reclaim once they
have been idle long enough.
"""

from __future__ import annotations

from typing import Any, cast

import redis
from redis.cluster import ClusterNode, RedisCluster

Entry = tuple[str, dict[str, str]]


def _entries(raw: Any) -> list[Entry]:
    """(id, fields); entries deleted meanwhile come back without fields."""
    return [(entry_id, fields) for entry_id, fields in raw or [] if fields is not None]


_decoding: dict[int, tuple[Any, redis.Redis]] = {}


def decoding(client: redis.Redis) -> redis.Redis:
    """A client of the same Redis (or cluster) whose replies are text, decoded by the protocol
    parser: decoding ~30 fields per entry in Python costs more than the rest of an ingest.
    Bytes that are not UTF-8 become lone surrogates instead of failing the whole read: the
    ledger parks such an entry. Made once per client (a cluster client maps the slots)."""
    kept = _decoding.get(id(client))
    if kept is not None and kept[0] is client:
        return kept[1]
    text = {"decode_responses": True, "encoding_errors": "surrogateescape"}
    made: redis.Redis
    if isinstance(client, RedisCluster):
        nodes = [ClusterNode(n.host, n.port) for n in client.get_primaries()]
        options = client.get_default_node().redis_connection.connection_pool.connection_kwargs
        keep = {k: options[k] for k in ("socket_timeout", "socket_connect_timeout") if k in options}
        made = cast(redis.Redis, RedisCluster(startup_nodes=nodes, **keep, **text))
    else:
        kwargs = {**client.connection_pool.connection_kwargs, **text}
        pool = redis.ConnectionPool(
            connection_class=client.connection_pool.connection_class, **kwargs
        )
        made = redis.Redis(connection_pool=pool)
    _decoding[id(client)] = (client, made)
    return made


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class UsageStream:
    def __init__(self, client: redis.Redis, key: str, group: str) -> None:
        self.client = decoding(client)
        self.key = key
        self.group = group

    def ensure_group(self) -> None:
        """Create the group at the start of the stream (a fresh or wiped Redis has none)."""
        try:
            self.client.xgroup_create(self.key, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, consumer: str, *, count: int, block_ms: int | None = None) -> list[Entry]:
        """Entries never delivered to any consumer of the group."""
        reply: Any = self.client.xreadgroup(
            self.group, consumer, {self.key: ">"}, count=count, block=block_ms
        )
        return _entries(reply[0][1]) if reply else []

    def held(self, consumer: str, *, count: int) -> list[Entry]:
        """Entries delivered to this consumer and not yet acknowledged, oldest first: what an
        earlier read of the same process left when it failed (Redis went away mid-batch)."""
        reply: Any = self.client.xreadgroup(self.group, consumer, {self.key: "0"}, count=count)
        return _entries(reply[0][1]) if reply else []

    def claim(self, consumer: str, *, min_idle_ms: int, count: int) -> list[Entry]:
        """Entries that some consumer (maybe a dead one) has held unacknowledged too long."""
        reply = self.client.xautoclaim(
            self.key, self.group, consumer, min_idle_time=min_idle_ms, start_id="0-0", count=count
        )
        return _entries(reply[1])

    def ack(self, ids: list[str]) -> int:
        return int(self.client.xack(self.key, self.group, *ids)) if ids else 0

    def pending(self) -> int:
        try:
            return int(self.client.xpending(self.key, self.group)["pending"])
        except redis.ResponseError:
            return 0

    def backlog(self) -> int:
        """Entries not yet acknowledged: pending ones and those never delivered."""
        try:
            groups = self.client.xinfo_groups(self.key)
        except redis.ResponseError:
            return 0
        for info in groups:
            if _text(info["name"]) == self.group:
                return self._undelivered(info) + int(info["pending"])
        return int(self.client.xlen(self.key))

    def length(self) -> int:
        return int(self.client.xlen(self.key))

    def oldest_unacknowledged_ms(self) -> int | None:
        """When the oldest entry not yet acknowledged was added (an entry id is its time in
        ms): the first pending one or the first never delivered, or the stream's first while
        the group has never read. None: there is none."""
        try:
            groups = self.client.xinfo_groups(self.key)
        except redis.ResponseError:  # no stream yet
            return None
        info = next((g for g in groups if _text(g["name"]) == self.group), None)
        first_unread = "-" if info is None else "(" + _text(info["last-delivered-id"])
        first: Any = self.client.xrange(self.key, first_unread, count=1)
        ids = [entry_id for entry_id, _ in first]
        if info is not None and int(info["pending"]):
            summary: Any = self.client.xpending(self.key, self.group)
            ids.append(summary["min"])
        return min((int(_text(i).split("-")[0]) for i in ids), default=None)

    def _undelivered(self, info: dict[Any, Any]) -> int:
        if info.get("lag") is not None:
            return int(info["lag"])
        # Redis cannot tell (a group loaded from an AOF, or moved by XGROUP SETID): count
        after = "(" + _text(info["last-delivered-id"])
        return len(_entries(self.client.xrange(self.key, min=after, max="+")))

    def forget_idle_consumers(self, *, idle_ms: int) -> int:
        """Drop consumers that hold nothing and have not read for `idle_ms` (dead processes)."""
        dropped = 0
        try:
            consumers = self.client.xinfo_consumers(self.key, self.group)
        except redis.ResponseError:
            return 0
        for info in consumers:
            if int(info["pending"]) == 0 and int(info["idle"]) >= idle_ms:
                self.client.xgroup_delconsumer(self.key, self.group, _text(info["name"]))
                dropped += 1
        return dropped
