"""One process tree for ``credbroker up``: start children, watch them, stop them all.

Each child runs in its own session, so a Ctrl-C at the terminal reaches only
the supervisor, which then stops the children in order (services first, then
the Redis and sandbox they use): SIGTERM, a grace period, SIGKILL to the
child's whole process group. A child that dies on its own stops everything.
Children's output is passed through line by line, prefixed with their name.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import IO, Any

__all__ = ["Supervisor", "Child", "Stopped", "ChildDied"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """Raised inside a wait when a stop signal arrived."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)


class ChildDied(Exception):
    """Raised inside a wait when a child exited on its own."""

    def __init__(self, child: Child) -> None:
        self.child = child
        super().__init__(f"{child.name} {child.status or 'exited'}")


@dataclass
class Child:
    """A supervised process; ``infra`` ones (Redis, the sandbox) stop last."""

    name: str
    process: subprocess.Popen[bytes]
    infra: bool = False
    lines: list[str] = field(default_factory=list)  # the first few output lines, for readiness checks
    reader: threading.Thread | None = None
    status: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def exited(self) -> bool:
        """True once the process has exited, without reaping it.

        Keeping the zombie keeps its pid (and process group id) from being
        reused, so the group can still be swept with SIGKILL afterwards.
        """
        if self.process.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is None or info.si_pid == 0:
            return False
        if info.si_code == os.CLD_EXITED:
            self.status = f"exited with code {info.si_status}"
        else:
            self.status = f"was killed by {signal.Signals(info.si_status).name}"
        return True

    def signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


class Supervisor:
    """Starts children, waits on conditions while watching them, stops them all."""

    def __init__(self, out: IO[str] | None = None, stop_timeout: float = 15.0) -> None:
        self.children: list[Child] = []
        self.out = out or sys.stdout
        self.stop_timeout = stop_timeout
        # A self-pipe, not a threading.Event: a signal handler must not take a lock
        # that the interrupted code may be holding.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._signal: int | None = None
        self._write_lock = threading.Lock()
        self._old_handlers: dict[int, Any] = {}
        self._stopping = False

    # -- signals ---------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for signum in STOP_SIGNALS:
            self._old_handlers[signum] = signal.signal(signum, self._on_signal)
        self._old_handlers[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, self._on_child)

    def restore_signal_handlers(self) -> None:
        for signum, handler in self._old_handlers.items():
            signal.signal(signum, handler)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._signal is None:
            self._signal = signum
        elif self._stopping:  # a second Ctrl-C: no more grace
            for child in self.children:
                child.signal_group(signal.SIGKILL)
        self._wake()

    def _on_child(self, _signum: int, _frame: FrameType | None) -> None:
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: a wake-up is already pending

    def _sleep(self, seconds: float) -> None:
        """Sleep until woken by a signal or a child's exit, at most ``seconds``."""
        try:
            ready, _, _ = select.select([self._wake_r], [], [], max(0.0, seconds))
        except InterruptedError:
            return
        if ready:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass

    @property
    def stop_requested(self) -> int | None:
        return self._signal

    # -- output ------------------------------------------------------------------------

    def say(self, name: str, text: str) -> None:
        with self._write_lock:
            for line in text.splitlines() or [""]:
                self.out.write(f"{name:<10}| {line}\n")
            self.out.flush()

    def _pump(self, child: Child, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            if len(child.lines) < 50:
                child.lines.append(line)
            self.say(child.name, line)
        stream.close()

    # -- children ------------------------------------------------------------------------

    def spawn(self, name: str, argv: Sequence[str], env: Mapping[str, str], *, infra: bool = False,
              cwd: str | None = None) -> Child:
        process = subprocess.Popen(
            list(argv), env=dict(env), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        child = Child(name, process, infra=infra)
        assert process.stdout is not None
        child.reader = threading.Thread(target=self._pump, args=(child, process.stdout), name=f"out-{name}",
                                         daemon=True)
        child.reader.start()
        self.children.append(child)
        return child

    def adopt(self, name: str, process: subprocess.Popen[bytes], *, infra: bool = True) -> Child:
        """Supervise a process started elsewhere (in its own session)."""
        child = Child(name, process, infra=infra)
        self.children.append(child)
        return child

    def dead_child(self) -> Child | None:
        for child in self.children:
            if child.exited():
                return child
        return None

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
        """Poll ``predicate`` until truthy, raising Stopped, ChildDied or TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            self._check()
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
            self._sleep(min(interval, remaining))

    def run(self) -> None:
        """Block until a stop signal (raises Stopped) or a child's death (raises ChildDied)."""
        while True:
            self._check()
            # SIGCHLD and stop signals wake this at once; the timeout only bounds a missed wake-up.
            self._sleep(5.0)

    def _check(self) -> None:
        if self._signal is not None:
            raise Stopped(self._signal)
        dead = self.dead_child()
        if dead is not None:
            raise ChildDied(dead)

    # -- stopping ------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop every child: services first, then infrastructure; idempotent."""
        self._stopping = True
        services = [c for c in self.children if not c.infra]
        infra = [c for c in self.children if c.infra]
        self._stop_tier(list(reversed(services)))
        self._stop_tier(list(reversed(infra)))

    def _stop_tier(self, children: list[Child]) -> None:
        for child in children:
            if not child.exited():
                try:
                    child.process.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + self.stop_timeout
        for child in children:
            while not child.exited() and time.monotonic() < deadline:
                self._sleep(min(0.1, max(0.0, deadline - time.monotonic())))
            if not child.exited():
                self.say("supervisor", f"{child.name} did not stop within {self.stop_timeout:g}s: killing it")
            # Sweep the whole group: a pool process whose parent is gone must not linger.
            child.signal_group(signal.SIGKILL)
            child.process.wait()
            if child.reader is not None:
                child.reader.join(5)

    def close(self) -> None:
        self.restore_signal_handlers()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
