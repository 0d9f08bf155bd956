"""The Redis Cluster of bin/test's second pass (tests/fakes/redis_cluster.py): a killed master's
replica takes over with the writes it acknowledged while the other masters keep serving, the
killed node comes back as a replica, and `python -m tests.fakes.redis_cluster -- <command>`
hands the command the cluster, returns its status and leaves no node running, also when it is
interrupted or killed. Against real redis-server processes on loopback ports (7300-7399)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.redis_cluster import RedisCluster
from tests.fakes.redis_server import wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("redis-server") is None or shutil.which("redis-cli") is None,
        reason="redis-server or redis-cli is missing",
    ),
    # the cluster pass itself runs under such a cluster: these start their own, once is enough
    pytest.mark.skipif(
        "TEST_REDIS_CLUSTER_NODES" in os.environ, reason="run in the plain pass only"
    ),
]

ROOT = Path(__file__).resolve().parents[2]

# Run by the harness: notes what it was handed (the seeds and the nodes' process ids), writes
# and reads a key through the cluster, then exits with argv[2] or, given "wait", sleeps.
COMMAND = """
import json, os, sys, time
import redis, redis.cluster
seeds = os.environ["QUOTA_REDIS_CLUSTER_NODES"]
nodes = [redis.cluster.ClusterNode(*seed.split(":")) for seed in seeds.split(",")]
client = redis.cluster.RedisCluster(startup_nodes=nodes)
client.set("{tag}key", "value")
ports = [int(seed.split(":")[1]) for seed in seeds.split(",")]
pids = [redis.Redis(port=port).info("server")["process_id"] for port in ports]
noted = {"seeds": seeds, "test": os.environ["TEST_REDIS_CLUSTER_NODES"],
         "value": client.get("{tag}key").decode(), "pids": pids}
with open(sys.argv[1] + ".tmp", "w") as out:
    json.dump(noted, out)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2] == "wait":
    time.sleep(120)
sys.exit(int(sys.argv[2]))
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    started = RedisCluster(tmp_path)
    started.start()
    yield started
    started.stop()


def _tags_on_each_master(cluster: RedisCluster) -> dict[int, str]:
    """A key per master, each with a hash tag of its own: {master port: key}."""
    keys: dict[int, str] = {}
    for n in range(100):
        key = f"q:{{tag{n}}}:counter"
        keys.setdefault(cluster.master_of(key), key)
    assert sorted(keys) == cluster.masters()
    return keys


def _write_replicated(cluster: RedisCluster, master: int, key: str, value: str) -> None:
    """SET on the key's master, then WAIT on the same connection until its replica has it."""
    pipe = cluster.nodes[master].client.pipeline(transaction=False)
    pipe.set(key, value)
    pipe.execute_command("WAIT", 1, 5000)
    assert pipe.execute() == [True, 1]


def test_a_killed_masters_replica_takes_over_with_its_acknowledged_writes(
    cluster: RedisCluster,
) -> None:
    keys = _tags_on_each_master(cluster)
    for master, key in keys.items():
        _write_replicated(cluster, master, key, f"on {master}")
    victim, *others = sorted(keys)
    replica = cluster.replica_of(victim)

    reads, done = [0], threading.Event()
    failures: list[BaseException] = []

    def read_the_others() -> None:
        client = cluster.client()
        while not done.is_set():
            try:
                for master in others:
                    assert client.get(keys[master]) == f"on {master}".encode()
                reads[0] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    reader = threading.Thread(target=read_the_others)
    reader.start()
    try:
        wait_until(lambda: reads[0] > 0 or bool(failures), seconds=10, what="the first reads")
        cluster.kill_master(victim)
        cluster.wait_failover()
        before = reads[0]
        wait_until(lambda: reads[0] > before or bool(failures), seconds=10, what="more reads")
    finally:
        done.set()
        reader.join(timeout=30)
    assert failures == []

    assert victim not in cluster.masters()
    assert replica in cluster.masters()
    assert cluster.master_of(keys[victim]) == replica
    assert cluster.nodes[replica].client.get(keys[victim]) == f"on {victim}".encode()
    assert cluster.client().get(keys[victim]) == f"on {victim}".encode()

    cluster.restart(victim)
    assert cluster.replica_of(replica) == victim
    assert sorted(cluster.masters()) == sorted([replica, *others])
    on_the_old_master = cluster.nodes[victim].client
    on_the_old_master.execute_command("READONLY")  # a replica's own reads of its slots
    assert on_the_old_master.get(keys[victim]) == f"on {victim}".encode()

    cluster.flush()
    client = cluster.client()
    assert [client.get(key) for key in keys.values()] == [None, None, None]
    assert sum(cluster.nodes[m].client.dbsize() for m in cluster.masters()) == 0


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie nobody reaped yet does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _harness(tmp_path: Path, status: str) -> subprocess.Popen[bytes]:
    script = tmp_path / "command.py"
    script.write_text(COMMAND)
    command = [sys.executable, "-m", "tests.fakes.redis_cluster", "--", sys.executable]
    command += [str(script), str(tmp_path / "noted.json"), status]
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # where the cluster's directory goes
        stderr=subprocess.PIPE,
        start_new_session=True,  # a process group of its own, as a terminal gives bin/test
    )


def _noted(tmp_path: Path, harness: subprocess.Popen[bytes]) -> dict[str, object]:
    def noted() -> bool:
        assert harness.poll() is None or (tmp_path / "noted.json").exists(), "harness exited"
        return (tmp_path / "noted.json").exists()

    wait_until(noted, seconds=120, what="the command to run")
    return dict(json.loads((tmp_path / "noted.json").read_text()))


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of the harness's process group (the command, if it outlived it)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def _cluster_gone(tmp_path: Path, pids: list[int]) -> None:
    wait_until(lambda: not any(map(_running, pids)), seconds=10, what="the nodes to end")
    assert list(tmp_path.glob("redis-cluster-*")) == []


def test_the_command_gets_the_cluster_and_its_status_is_the_harness_status(
    tmp_path: Path,
) -> None:
    harness = _harness(tmp_path, "3")
    try:
        _, stderr = harness.communicate(timeout=120)
    finally:
        _kill_group(harness.pid)
        harness.wait()
    assert harness.returncode == 3, stderr.decode()
    noted = _noted(tmp_path, harness)
    seeds = str(noted["seeds"])
    assert noted["test"] == seeds
    assert len(seeds.split(",")) == 6
    assert noted["value"] == "value"
    assert f"redis cluster at {seeds}" in stderr.decode()
    _cluster_gone(tmp_path, noted["pids"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)]
)
def test_an_interrupted_harness_stops_its_cluster(tmp_path: Path, signum: int, status: int) -> None:
    """Ctrl-C reaches the whole foreground process group; SIGTERM the harness alone."""
    harness = _harness(tmp_path, "wait")
    try:
        noted = _noted(tmp_path, harness)
        if signum == signal.SIGINT:
            os.killpg(harness.pid, signum)
        else:
            harness.send_signal(signum)
        assert harness.wait(timeout=60) == status
        _cluster_gone(tmp_path, noted["pids"])  # type: ignore[arg-type]
    finally:
        _kill_group(harness.pid)
        harness.wait()


def test_a_killed_harness_leaves_no_node_running(tmp_path: Path) -> None:
    harness = _harness(tmp_path, "wait")
    try:
        noted = _noted(tmp_path, harness)
        harness.kill()  # SIGKILL: no handler runs, the nodes die with their parent
        harness.wait()
        pids: list[int] = noted["pids"]  # type: ignore[assignment]
        wait_until(lambda: not any(map(_running, pids)), seconds=10, what="the nodes to end")
    finally:
        _kill_group(harness.pid)
