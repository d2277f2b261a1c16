"""Throwaway Redis Cluster and Sentinel deployments on loopback, for tests and the bench.

::

    with ClusterServers.start(primaries=3, replicas=1) as cluster:
        cluster.url            # redis://127.0.0.1:<a node's port>/0
        cluster.kill_primary_of("sealstream:req:{0}")   # SIGKILL; its replica takes over

    with SentinelServers.start() as deployment:
        deployment.url         # redis+sentinel://127.0.0.1:<p1>,.../sealstream
        deployment.kill_primary()

Every process runs from ``redis-server`` (Sentinel as ``redis-server --sentinel``)
on free ports of 127.0.0.1, in one temp directory removed afterwards.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from worker.errors import ConfigError
from worker.testing import free_port

#: Short node timeout: a killed primary is failed over in a few seconds.
NODE_TIMEOUT_MS = 1000
SERVICE = "sealstream"


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too (both under 65536)."""
    for _ in range(200):
        port = random.randrange(20_000, 55_000)  # noqa: S311 - not a secret
        if all(_free(p) for p in (port, port + 10_000)):
            return port
    raise ConfigError("no free port pair for a cluster node")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ConfigError(f"{name} is not installed (Debian/Ubuntu: apt-get install redis-server)")
    return path


def _cli(port: int, *args: str, timeout: float = 10.0) -> str:
    """``redis-cli -p port args...``'s output (empty when the node does not answer)."""
    try:
        done = subprocess.run(  # noqa: S603 - our own binary and arguments
            [_binary("redis-cli"), "-h", "127.0.0.1", "-p", str(port), *args],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return ""
    return done.stdout.decode(errors="replace")


def _wait(what: str, ok: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.05)
    raise ConfigError(f"timed out waiting for {what}")


def _knows(port: int, node_id: str) -> bool:
    return node_id in _cli(port, "CLUSTER", "NODES")


def _info(port: int, section: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in _cli(port, "INFO", section, timeout=2).splitlines():
        name, sep, value = line.strip().partition(":")
        if sep:
            out[name] = value
    return out


@dataclass(slots=True)
class _Procs:
    directory: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def launch(self, port: int, *args: str) -> None:
        log = self.directory / f"redis-{port}.log"
        self.procs[port] = subprocess.Popen(  # noqa: S603 - our own binary and arguments
            [_binary("redis-server"), *args, "--port", str(port), "--bind", "127.0.0.1",
             "--logfile", str(log), "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        _wait(
            f"redis-server on {port}", lambda: _cli(port, "PING", timeout=1).startswith("PONG"), 10
        )

    def kill(self, port: int) -> None:
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def _common() -> list[str]:
    # No delay before a replica's first full sync: a replica never synced cannot
    # take over, and the tests kill primaries a second after start.
    return ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]


def _synced(port: int) -> bool:
    """Whether ``port`` is a primary, or a replica whose link to its primary is up."""
    info = _info(port, "replication")
    return info.get("role") == "master" or info.get("master_link_status") == "up"


@dataclass(slots=True)
class ClusterServers:
    """A Redis Cluster of ``primaries`` primaries with ``replicas`` replicas each."""

    ports: list[int]
    procs: _Procs

    @property
    def url(self) -> str:
        """A ``redis://`` URL naming the first node (any node is enough)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    @classmethod
    def launch(
        cls, *, primaries: int = 3, replicas: int = 1, timeout: float = 60.0
    ) -> ClusterServers:
        """Start the nodes, create the cluster and wait for ``cluster_state:ok``."""
        procs = _Procs(Path(tempfile.mkdtemp(prefix="sealstream-cluster-")))
        ports = [cluster_port() for _ in range(primaries * (1 + replicas))]
        servers = cls(ports=ports, procs=procs)
        try:
            for port in ports:
                procs.launch(
                    port, *_common(), "--cluster-enabled", "yes",
                    "--cluster-config-file", f"nodes-{port}.conf",
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                )  # fmt: skip
            if primaries < 3:
                # redis-cli --cluster create wants 3 primaries: assign the slots by hand.
                servers._assign(primaries, replicas)
            else:
                nodes = [f"127.0.0.1:{p}" for p in ports]
                done = subprocess.run(  # noqa: S603
                    [_binary("redis-cli"), "--cluster", "create", *nodes,
                     "--cluster-replicas", str(replicas), "--cluster-yes"],
                    capture_output=True, timeout=timeout, check=False,
                )  # fmt: skip
                _check_created(done)
            servers.wait_ok(timeout)
        except BaseException:
            procs.stop()
            raise
        return servers

    @classmethod
    @contextlib.contextmanager
    def start(cls, *, primaries: int = 3, replicas: int = 1) -> Iterator[ClusterServers]:
        """``launch`` as a context manager that stops every node afterwards."""
        servers = cls.launch(primaries=primaries, replicas=replicas)
        try:
            yield servers
        finally:
            servers.stop()

    def _assign(self, primaries: int, replicas: int) -> None:
        """Split the slots evenly over the first ``primaries`` nodes, join every node,
        and make the rest replicas, ``replicas`` per primary in turn."""
        first = self.ports[0]
        for i, port in enumerate(self.ports[:primaries]):
            low, high = 16384 * i // primaries, 16384 * (i + 1) // primaries - 1
            _cli(port, "CLUSTER", "ADDSLOTSRANGE", str(low), str(high))
            _cli(port, "CLUSTER", "SET-CONFIG-EPOCH", str(i + 1))
        for port in self.ports[1:]:
            _cli(port, "CLUSTER", "MEET", "127.0.0.1", str(first))
        for j, port in enumerate(self.ports[primaries:]):
            primary = self.ports[j % primaries]
            node_id = _cli(primary, "CLUSTER", "MYID").strip()
            _wait(f"node {port} to know {primary}", partial(_knows, port, node_id), 30)
            _cli(port, "CLUSTER", "REPLICATE", node_id)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Wait until every live node reports ``cluster_state:ok`` with every slot served,
        and every replica has synced with its primary."""

        def ok() -> bool:
            live = list(self.procs.procs)
            states = [_info(p, "cluster") for p in live]
            if not all(s.get("cluster_enabled") == "1" for s in states):
                return False
            clusters = [_cli(p, "CLUSTER", "INFO", timeout=2) for p in live]
            if not all("cluster_state:ok" in c and "cluster_slots_ok:16384" in c for c in clusters):
                return False
            return all(_synced(p) for p in live)

        _wait("cluster_state:ok", ok, timeout)

    def primary_of(self, key: str) -> int:
        """The port of the primary that holds ``key``'s slot now."""
        port = next(iter(self.procs.procs))
        slot = int(_cli(port, "CLUSTER", "KEYSLOT", key).strip())
        for line in _cli(port, "CLUSTER", "NODES").splitlines():
            parts = line.split()
            if "master" not in parts[2] or "fail" in parts[2]:
                continue
            for span in parts[8:]:
                low, _, high = span.partition("-")
                if low.isdigit() and int(low) <= slot <= int(high or low):
                    return int(parts[1].split("@")[0].rsplit(":", 1)[1])
        raise ConfigError(f"no primary holds slot {slot}")

    def kill_primary_of(self, key: str) -> int:
        """SIGKILL the primary holding ``key``; return its port (its replica takes over)."""
        port = self.primary_of(key)
        self.procs.kill(port)
        return port

    def wait_promoted(self, key: str, dead: int, timeout: float = 60.0) -> int:
        """Wait until a live primary other than ``dead`` serves ``key``; return its port."""
        found: list[int] = []

        def ok() -> bool:
            try:
                port = self.primary_of(key)
            except ConfigError:
                return False
            found[:] = [port]
            return port != dead and port in self.procs.procs

        _wait(f"a new primary for {key}", ok, timeout)
        self.wait_ok(timeout)
        return found[0]

    def stop(self) -> None:
        """Stop every node and remove the directory."""
        self.procs.stop()


@dataclass(slots=True)
class SentinelServers:
    """One primary, one replica and three Sentinels watching service ``sealstream``."""

    primary: int
    replica: int
    sentinels: list[int]
    procs: _Procs

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:<s1>,127.0.0.1:<s2>,.../sealstream/0``."""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    @classmethod
    def launch(cls, *, timeout: float = 60.0) -> SentinelServers:
        """Start the servers and Sentinels; wait until the Sentinels know the replica."""
        procs = _Procs(Path(tempfile.mkdtemp(prefix="sealstream-sentinel-")))
        primary, replica = free_port(), free_port()
        sentinels = [free_port() for _ in range(3)]
        servers = cls(primary=primary, replica=replica, sentinels=sentinels, procs=procs)
        try:
            procs.launch(primary, *_common())
            procs.launch(replica, *_common(), "--replicaof", "127.0.0.1", str(primary))
            for port in sentinels:
                conf = procs.directory / f"sentinel-{port}.conf"
                conf.write_text(
                    f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                    f"sentinel down-after-milliseconds {SERVICE} {NODE_TIMEOUT_MS}\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
                procs.launch(port, str(conf), "--sentinel")
            _wait(
                "the sentinels to see the replica",
                lambda: (
                    all(
                        "num-slaves" in (out := _cli(p, "SENTINEL", "MASTER", SERVICE))
                        and _after(out, "num-slaves") == "1"
                        and _after(out, "num-other-sentinels") == "2"
                        for p in sentinels
                    )
                    and _synced(replica)
                ),
                timeout,
            )
        except BaseException:
            procs.stop()
            raise
        return servers

    @classmethod
    @contextlib.contextmanager
    def start(cls) -> Iterator[SentinelServers]:
        """``launch`` as a context manager that stops everything afterwards."""
        servers = cls.launch()
        try:
            yield servers
        finally:
            servers.stop()

    def kill_primary(self) -> int:
        """SIGKILL the primary; return its port."""
        self.procs.kill(self.primary)
        return self.primary

    def wait_promoted(self, timeout: float = 60.0) -> int:
        """Wait until the Sentinels name the replica as the primary; return its port."""
        _wait(
            "the replica's promotion",
            lambda: (
                all(
                    _cli(p, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).split()[-1:]
                    == [str(self.replica)]
                    for p in self.sentinels
                )
                and _info(self.replica, "replication").get("role") == "master"
            ),
            timeout,
        )
        self.primary, self.replica = self.replica, self.primary
        return self.primary

    def stop(self) -> None:
        """Stop every process and remove the directory."""
        self.procs.stop()


def _after(reply: str, name: str) -> str:
    """The value after ``name`` in a redis-cli flat field/value listing."""
    lines = [line.strip() for line in reply.splitlines()]
    try:
        return lines[lines.index(name) + 1]
    except (ValueError, IndexError):
        return ""


def _check_created(done: subprocess.CompletedProcess[bytes]) -> None:
    if done.returncode != 0:
        raise ConfigError(f"redis-cli --cluster create failed: {done.stdout[-500:]!r}")
