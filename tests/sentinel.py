"""A Redis Sentinel deployment of our own on loopback: a master, a replica and
three sentinels, all started from the installed ``redis-server``; it can fail
the master over or kill it, as a real outage would."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import redis

from tests.cluster import wait_for
from tests.faults import free_port

__all__ = ["SentinelSet", "MASTER_NAME"]

MASTER_NAME = "credbroker-test"


class SentinelSet:
    def __init__(self, workdir: Path, sentinels: int = 3) -> None:
        self.workdir = workdir
        self.exe = shutil.which("redis-server")
        assert self.exe, "redis-server not on PATH"
        self.data_ports = [free_port(), free_port()]
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ";".join(f"sentinel://127.0.0.1:{p}" for p in self.sentinel_ports)
        return f"{hosts}/0?master_name={MASTER_NAME}"

    def _spawn(self, port: int, args: list[str]) -> None:
        assert self.exe
        log = open(self.workdir / f"redis-{port}.log", "ab")  # noqa: SIM115 - closed with the process
        self.procs[port] = subprocess.Popen([self.exe, *args], stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def _start_data(self, port: int, replica_of: int | None) -> None:
        args = ["--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.workdir), "--dbfilename", f"dump-{port}.rdb"]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self._spawn(port, args)
        wait_for(lambda: self._ping(port), 10, what=f"redis on {port}")

    def start(self) -> None:
        master, replica = self.data_ports
        self._start_data(master, None)
        self._start_data(replica, master)
        for port in self.sentinel_ports:
            conf = self.workdir / f"sentinel-{port}.conf"
            conf.write_text("\n".join([
                f"port {port}", "bind 127.0.0.1", f"dir {self.workdir}",
                f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master} 2",
                f"sentinel down-after-milliseconds {MASTER_NAME} 1000",
                f"sentinel failover-timeout {MASTER_NAME} 4000",
                f"sentinel parallel-syncs {MASTER_NAME} 1", ""]))
            self._spawn(port, [str(conf), "--sentinel"])
        wait_for(self._ready, 30, 0.1, what="sentinels to see the replica and each other")

    def _ping(self, port: int) -> bool:
        try:
            return bool(redis.Redis(port=port, socket_connect_timeout=0.2, socket_timeout=0.5).ping())
        except redis.RedisError:
            return False

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=1, decode_responses=True)

    def _ready(self) -> bool:
        try:
            for port in self.sentinel_ports:
                info = self._sentinel(port).sentinel_master(MASTER_NAME)
                if int(info.get("num-other-sentinels", 0)) < len(self.sentinel_ports) - 1:
                    return False
                if int(info.get("num-slaves", 0)) < 1:
                    return False
            return True
        except redis.RedisError:
            return False

    def agreed_master(self) -> int | None:
        """The master every sentinel names, or None while they disagree."""
        seen = set()
        for port in self.sentinel_ports:
            try:
                _host, p = self._sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
            except (redis.RedisError, TypeError):
                return None
            seen.add(int(p))
        return seen.pop() if len(seen) == 1 else None

    def master_port(self) -> int | None:
        for port in self.sentinel_ports:
            try:
                _host, p = self._sentinel(port).sentinel_get_master_addr_by_name(MASTER_NAME)
                return int(p)
            except (redis.RedisError, TypeError):
                continue
        return None

    def _replica_synced(self, port: int) -> bool:
        try:
            info = redis.Redis(port=port, socket_timeout=0.5).info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"
        except redis.RedisError:
            return False

    def failover(self) -> int:
        """``SENTINEL FAILOVER``: promote the replica; returns the new master's port."""
        old = self.agreed_master()
        assert old is not None
        other = next(p for p in self.data_ports if p != old)
        wait_for(lambda: self._replica_synced(other), 30, 0.1, what="the replica to be in sync")
        self._sentinel(self.sentinel_ports[0]).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        wait_for(lambda: self.agreed_master() == other, 30, 0.1, what="sentinels to name the new master")
        return other

    def kill_master(self) -> int:
        """SIGKILL the master; sentinels promote the replica. The old one comes
        back as a replica of the new master. Returns the new master's port."""
        old = self.master_port()
        assert old is not None
        other = next(p for p in self.data_ports if p != old)
        wait_for(lambda: self._replica_synced(other), 30, 0.1, what="the replica to be in sync")
        proc = self.procs[old]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: self.agreed_master() == other, 30, 0.1, what="sentinels to promote the replica")
        self._start_data(old, other)
        return other

    def disrupt(self) -> int:
        """One outage, alternating a ``SENTINEL FAILOVER`` and a killed master."""
        self._disruptions = getattr(self, "_disruptions", 0) + 1
        return self.failover() if self._disruptions % 2 else self.kill_master()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
