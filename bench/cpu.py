"""CPU time per operation, by process group, from /proc.

On a shared 2-core machine throughput swings with the neighbours' load; CPU
seconds spent by each of our processes per operation do not, so they say
where the cost is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .cluster import process_tree

__all__ = ["CpuMeter"]

_HZ = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _HZ


def _machine() -> tuple[float, float]:
    """(all CPU seconds, idle CPU seconds) of the machine so far."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values) / _HZ, (values[3] + values[4]) / _HZ


class CpuMeter:
    """CPU seconds of the driver, workers, sandbox and Redis between ``start`` and ``stop``."""

    def __init__(self, cluster: Any) -> None:
        self.cluster = cluster
        try:
            self.redis_pid: int | None = int(cluster.redis.info("server")["process_id"])
        except Exception:  # noqa: BLE001 - Redis on another host: not counted
            self.redis_pid = None

    def _groups(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {"driver": [os.getpid()], "sandbox": [self.cluster.sandbox.proc.pid]}
        if self.redis_pid is not None:
            groups["redis"] = [self.redis_pid]
        for name in self.cluster.procs:
            if name.startswith("w"):
                tree = process_tree(self.cluster.procs[name].pid)
                groups.setdefault("worker parents", []).append(tree[0])
                groups.setdefault("worker children", []).extend(tree[1:])
        return groups

    def _snapshot(self) -> dict[str, float]:
        return {g: sum(_cpu_seconds(p) for p in pids) for g, pids in self._groups().items()}

    def start(self) -> None:
        self._before = self._snapshot()
        self._machine_before = _machine()

    def stop(self, operations: int) -> dict[str, float]:
        """Milliseconds of CPU per operation by group, plus ``ours``, ``machine`` and ``busy cores``."""
        after = self._snapshot()
        total, idle = _machine()
        wall = total - self._machine_before[0]
        out = {g: 1000 * (after[g] - self._before.get(g, 0.0)) / operations for g in after}
        out["ours"] = sum(out.values())
        busy = (total - self._machine_before[0]) - (idle - self._machine_before[1])
        out["machine"] = 1000 * busy / operations
        cores = os.cpu_count() or 1
        out["busy cores"] = cores * busy / wall if wall > 0 else float("nan")
        return out

    @staticmethod
    def describe(label: str, cost: dict[str, float]) -> str:
        parts = ", ".join(f"{g} {v:.2f}" for g, v in cost.items() if g not in ("ours", "machine", "busy cores"))
        return (f"{label}: {parts}; ours {cost['ours']:.2f} of {cost['machine']:.2f} ms the whole machine spent "
                f"({cost['busy cores']:.1f} cores busy)")
