"""Partitions of the quota state: where a tenant's decisions live.

On one Redis there is one partition and every key carries the deployment's hash tag, as it
always did. On a Redis Cluster the state is split into partitions, each with a hash tag of
its own: a tenant's limits, leases, idempotency keys and usage stream live on its partition
(`tenant id mod count`), so each decision is one script on one shard. The tag of partition
`i` is chosen so that its slot lies in the i-th of `count` equal ranges of the slot space:
the cluster's masters, which own even ranges of slots, own even numbers of partitions.

A reservation id names its partition in its first two hex digits, so a settlement finds the
lease without the tenant (by the key's digest alone when the database is down).
"""

from __future__ import annotations

import secrets

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

MAX_PARTITIONS = 256  # two hex digits of a reservation id


def partition_tags(tag: str, count: int) -> tuple[str, ...]:
    """The hash tag of each partition: `tag` alone for one; `tag.<i>` (or `tag.<i>.<n>`)
    with its slot in the middle half of the i-th range for several."""
    if count == 1:
        return (tag,)
    if not 1 < count <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be 1 to {MAX_PARTITIONS}, not {count}")
    width = REDIS_CLUSTER_HASH_SLOTS / count
    tags = []
    for index in range(count):
        low, high = (index + 0.25) * width, (index + 0.75) * width
        candidate, attempt = f"{tag}.{index}", 0
        while not low <= key_slot(candidate.encode()) < high:
            attempt += 1
            candidate = f"{tag}.{index}.{attempt}"
        tags.append(candidate)
    return tuple(tags)


def tenant_partition(tenant_id: int, count: int) -> int:
    return tenant_id % count


def reservation_id_new(partition: int) -> str:
    """`rsv_` and 24 hex digits, the first two the partition's number."""
    return f"rsv_{partition:02x}{secrets.token_hex(11)}"


def reservation_partition(reservation_id: str, count: int) -> int:
    """The partition a reservation id names (0 for one that names none: it is not found)."""
    if count == 1:
        return 0
    try:
        index = int(reservation_id[4:6], 16)
    except ValueError:
        return 0
    return index if index < count else 0
