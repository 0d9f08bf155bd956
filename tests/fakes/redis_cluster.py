"""A Redis Cluster of a test's own: 3 masters and 3 replicas of Debian's redis-server on free
loopback ports (7300-7399, each with its cluster bus port 10000 above), every node in its own
directory with an AOF fsynced every second, which a test can kill and start again.

The node timeout is short (1.5 s) so that a replica takes over a killed master within seconds,
and `cluster-require-full-coverage no` keeps the other masters serving while one partition
has no master. The nodes die with the thread that started them (SIGKILL on its end, and
`stop` at exit), so a test run that is killed or interrupted leaves none behind: start and
restart them from the main thread.

`python -m tests.fakes.redis_cluster -- <command...>` starts one, runs the command with
`QUOTA_REDIS_CLUSTER_NODES` (and `TEST_REDIS_CLUSTER_NODES`, which tells the tests the cluster
is theirs to flush) set to its seeds, stops it and exits with the command's status: bin/test's
second pass runs the quota and ledger tests so."""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import redis
import redis.cluster

from tests.fakes.redis_server import free_port, wait_until

PORTS = range(7300, 7400)
BUS_OFFSET = 10000  # a node's cluster bus listens on its port + 10000
NODE_TIMEOUT_MS = 1500
NODES, REPLICAS = 6, 1
START_SECONDS = 60
FAILOVER_SECONDS = 30


def _free_node_port(taken: set[int]) -> int:
    """A port free for a node and for its cluster bus, not among `taken`."""
    for port in PORTS:
        if port in taken:
            continue
        try:
            free_port(range(port, port + 1))
            free_port(range(port + BUS_OFFSET, port + BUS_OFFSET + 1))
        except RuntimeError:
            continue
        return port
    raise RuntimeError(f"no free port pair in {PORTS}")


def _info(client: redis.Redis, section: str) -> dict[str, str]:
    text = client.execute_command("INFO", section)
    if isinstance(text, dict):  # redis-py parses INFO itself
        return {str(k): str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in text.decode().splitlines() if ":" in line)


class PortTaken(RuntimeError):
    """Another process bound the node's port (or its bus port) between the probe and the bind."""


class Node:
    """One redis-server of the cluster, in `directory`/<port>."""

    def __init__(self, directory: Path, port: int) -> None:
        self.port = port
        self.directory = directory / str(port)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process: subprocess.Popen[bytes] | None = None
        self.client = redis.Redis(port=port, socket_timeout=2, socket_connect_timeout=1)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        config = self.directory / "redis.conf"
        config.write_text(
            f"""port {self.port}
bind 127.0.0.1
dir {self.directory}
logfile {self.directory / "redis.log"}
daemonize no
save ""
appendonly yes
appendfsync everysec
cluster-enabled yes
cluster-config-file nodes.conf
cluster-node-timeout {NODE_TIMEOUT_MS}
cluster-require-full-coverage no
repl-diskless-sync-delay 0
repl-ping-replica-period 1
"""
        )
        self.process = subprocess.Popen(
            # SIGKILLed when the thread that started it ends (util-linux's setpriv, essential
            # in Debian: no Python runs between fork and exec)
            ["setpriv", "--pdeathsig", "KILL", "redis-server", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            # its own process group, so a Ctrl-C reaches the tests first and `stop` ends it
            start_new_session=True,
        )
        wait_until(self._answers, seconds=10, what=f"redis-server on {self.port} to answer")

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            log = self.directory / "redis.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            if "Address already in use" in tail:
                raise PortTaken(f"{self.port}: {tail}")
            raise RuntimeError(f"redis-server on {self.port} exited:\n{tail}")
        try:
            # the server that answers is this one, not another test's on a port just taken
            return int(_info(self.client, "server")["process_id"]) == self.process.pid
        except (redis.ConnectionError, redis.TimeoutError):
            return False

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.alive:
            assert self.process is not None
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)
        self.client.connection_pool.disconnect()

    def info(self, section: str) -> dict[str, str]:
        return _info(self.client, section)


class RedisCluster:
    """3 masters, 3 replicas. `directory`: where the nodes' directories go (a temporary
    directory of its own, removed by `stop`, when None)."""

    def __init__(self, directory: Path | None = None) -> None:
        self._own_directory = directory is None
        self.directory = (
            Path(tempfile.mkdtemp(prefix="redis-cluster-")) if directory is None else directory
        )
        self.nodes: dict[int, Node] = {}  # by port, in the order they were started

    @property
    def seeds(self) -> str:
        """Every node's "host:port", joined by commas (once started)."""
        return ",".join(node.address for node in self.nodes.values())

    def start(self) -> None:
        atexit.register(self.stop)
        try:
            for _ in range(NODES):
                self._start_node()
            create = subprocess.run(
                [
                    "redis-cli",
                    "--cluster",
                    "create",
                    *(n.address for n in self.nodes.values()),
                    *("--cluster-replicas", str(REPLICAS), "--cluster-yes"),
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=START_SECONDS,
            )
            if create.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed:\n{create.stdout.decode()}")
            wait_until(self._settled, seconds=START_SECONDS, what="the cluster to be ok")
        except BaseException:
            self.stop()
            raise

    def _start_node(self) -> None:
        """One more node on a free port; on another one if a concurrent test took it first."""
        for _ in range(5):
            node = Node(self.directory, _free_node_port(set(self.nodes)))
            self.nodes[node.port] = node
            try:
                node.start()
                return
            except PortTaken:
                del self.nodes[node.port]
                shutil.rmtree(node.directory, ignore_errors=True)
        raise RuntimeError(f"no port in {PORTS} stayed free long enough for a node")

    def _live(self) -> list[Node]:
        return [node for node in self.nodes.values() if node.alive]

    def _settled(self) -> bool:
        """Every live node says the cluster is ok, sees every live node as it is (its role and
        master, connected) and every dead one as failed, and gives each master's slots to it
        with its live replicas; every live replica is in sync with its master."""
        try:
            live = self._live()
            views = {n.port: n.client.execute_command("CLUSTER NODES") for n in live}
            truth: dict[str, tuple[str, str, str]] = {}
            for node in live:
                (me,) = [v for v in views[node.port].values() if "myself" in v["flags"]]
                role = "slave" if "slave" in me["flags"] else "master"
                truth[node.address] = (me["node_id"], role, me["master_id"])
            for node in live:
                if _info_cluster(node).get("cluster_state") != "ok":
                    return False
                replication = node.info("replication")
                if replication["role"] == "slave" and (
                    replication.get("master_link_status") != "up"
                    or str(replication.get("master_sync_in_progress")) != "0"
                ):
                    return False
                view = views[node.port]
                for other in self.nodes.values():
                    seen = view.get(other.address)
                    if seen is None:
                        return False
                    flags = set(seen["flags"].split(","))
                    if not other.alive:
                        if "fail" not in flags or not flags & {"slave", "master"}:
                            return False
                        continue
                    role = "slave" if "slave" in flags else "master"
                    if flags & {"fail", "fail?", "handshake", "noaddr"} or not seen["connected"]:
                        return False
                    if (seen["node_id"], role, seen["master_id"]) != truth[other.address]:
                        return False
                served = 0
                for start, end, master, *replicas in node.client.execute_command("CLUSTER SLOTS"):
                    address = f"127.0.0.1:{master[1]}"
                    if address not in truth or truth[address][1] != "master":
                        return False
                    expected = {p for p, t in truth.items() if t[2] == truth[address][0]}
                    if {f"127.0.0.1:{r[1]}" for r in replicas} != expected:
                        return False
                    served += end - start + 1
                if served != 16384:
                    return False
        except (redis.ConnectionError, redis.TimeoutError):
            return False
        return True

    def masters(self) -> list[int]:
        """The ports of the live masters, in port order."""
        return [n.port for n in self._live() if n.info("replication")["role"] == "master"]

    def replica_of(self, master: int) -> int:
        """The port of the live replica of the master on `master`."""
        for node in self._live():
            replication = node.info("replication")
            if replication["role"] == "slave" and int(replication["master_port"]) == master:
                return node.port
        raise LookupError(f"no live replica of {master}")

    def master_of(self, key: str) -> int:
        """The port of the master serving `key`'s slot, as the live nodes see it."""
        slot = int(self._live()[0].client.execute_command("CLUSTER KEYSLOT", key))
        for node in self._live():
            for start, end, master, *_ in node.client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(master[1])
        raise LookupError(f"no master serves slot {slot}")

    def kill_master(self, port: int) -> None:
        """SIGKILL the master on `port`; `wait_failover` waits for its replica to take over."""
        assert port in self.masters(), f"{port} is not a live master"
        self.nodes[port].kill()

    def wait_failover(self, seconds: float = FAILOVER_SECONDS) -> None:
        """Until a replica took over every killed master's slots and the cluster is ok."""
        wait_until(self._settled, seconds=seconds, what="a replica to take over")

    def restart(self, port: int) -> None:
        """Start the killed node on `port` again: it rejoins as a replica of the master that
        replaced it and syncs from it."""
        node = self.nodes[port]
        assert not node.alive, f"{port} is running"
        node.start()
        wait_until(
            lambda: node.info("replication")["role"] == "slave" and self._settled(),
            seconds=START_SECONDS,
            what=f"{port} to rejoin as a replica",
        )

    def flush(self) -> None:
        """FLUSHALL on every live master (their replicas follow)."""
        for port in self.masters():
            self.nodes[port].client.flushall()

    def client(self) -> redis.cluster.RedisCluster:
        """A cluster client that finds every node from a live one."""
        return redis.cluster.RedisCluster(host="127.0.0.1", port=self._live()[0].port)

    def stop(self) -> None:
        """Kill every node and remove their directories."""
        for node in self.nodes.values():
            node.kill()
        if self._own_directory:
            shutil.rmtree(self.directory, ignore_errors=True)
        else:
            for node in self.nodes.values():
                shutil.rmtree(node.directory, ignore_errors=True)
        atexit.unregister(self.stop)


def _info_cluster(node: Node) -> dict[str, str]:
    text = node.client.execute_command("CLUSTER INFO")
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    if isinstance(text, bytes):
        text = text.decode()
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


def main(argv: Sequence[str]) -> int:
    """Start a cluster, run the command after `--` with its seeds in the environment, stop
    the cluster; the command's exit status (130 after Ctrl-C)."""
    command = list(argv[1:] if argv[:1] == ["--"] else argv)
    if not command:
        print("usage: python -m tests.fakes.redis_cluster -- <command...>", file=sys.stderr)
        return 2
    cluster = RedisCluster()
    child: subprocess.Popen[bytes] | None = None

    def terminate(signum: int, frame: FrameType | None) -> None:
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    started = time.monotonic()
    try:
        cluster.start()
        print(
            f"redis cluster at {cluster.seeds} ({time.monotonic() - started:.1f} s to start)",
            file=sys.stderr,
        )
        seeds = {
            "QUOTA_REDIS_CLUSTER_NODES": cluster.seeds,
            "TEST_REDIS_CLUSTER_NODES": cluster.seeds,
        }
        child = subprocess.Popen(command, env={**os.environ, **seeds})
        try:
            return child.wait()
        except KeyboardInterrupt:  # the command had the Ctrl-C too: it ends in `finally`
            return 130
    finally:
        if child is not None and child.poll() is None:  # sent SIGTERM: a moment to end
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        cluster.stop()


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # while the cluster was starting: it is stopped already
        sys.exit(130)
