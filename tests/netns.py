"""Several "nodes" on this machine for multi-node tests: one network namespace per node, each with its
own address (10.77.0.1, .2, ...) on an `eth0` joined by a veth pair to a bridge in a namespace of its own,
so the machine's own network is never touched. Needs root. Each node's hostname still resolves to
127.0.0.1, as on many real machines: the launcher has to cope with that.

Tear-down kills every process in each namespace by pid (torchrun's workers start sessions of their own,
so killing a process group misses them), then deletes the namespaces; it runs even after a failure.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

SUBNET = "10.77.0"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Nodes:
    def __init__(self, count: int):
        tag = f"fnd{os.getpid() % 100000}x{time.monotonic_ns() % 1000}"
        self.names = [f"{tag}n{i}" for i in range(count)]
        self.bridge = f"{tag}br"
        self.addresses = [f"{SUBNET}.{i + 1}" for i in range(count)]

    def __enter__(self) -> "Nodes":
        try:
            _ip("netns", "add", self.bridge)
            _ip("-n", self.bridge, "link", "set", "lo", "up")
            _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, (name, address) in enumerate(zip(self.names, self.addresses)):
                _ip("netns", "add", name)
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("link", "add", "eth0", "netns", name, "type", "veth", "peer", "name", f"v{i}", "netns", self.bridge)
                _ip("-n", self.bridge, "link", "set", f"v{i}", "master", "br0", "up")
                _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
                _ip("-n", name, "link", "set", "eth0", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def popen(self, node: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[node], *cmd], **kwargs)

    def pids(self, node: int) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.names[node]], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]

    def kill(self, node: int, spare: set[int] = frozenset()) -> None:
        """SIGKILL every process of `node` except those in `spare` (e.g. its launcher)."""
        for pid in self.pids(node):
            if pid not in spare:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def link_down(self, node: int) -> None:
        """Cut the node off, as a failed switch port would: its processes live on, silent."""
        _ip("-n", self.bridge, "link", "set", f"v{node}", "down")

    def __exit__(self, *exc: object) -> None:
        for i, name in enumerate(self.names):
            for _ in range(3):  # processes may fork while we kill
                self.kill(i)
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.bridge], capture_output=True)
