"""Hosts for tests that cross a real network: each in its own Linux network namespace, all on one bridge.

The bridge lives in the test's own namespace (address .1 of a random 10.213.x.0/24), so the test talks
to every host directly; each host reaches the others through its veth pair and the bridge. Faults are
iproute2's: a link taken down (`ip link set down`), a rate limit (`tc tbf`), delay and loss (`tc netem`,
where the kernel has it: `netem_missing()`).
Everything made here is removed by `close()`. Needs root; `available()` says whether it works here.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass

DEVICE = "dsnet0"  # each host's interface, inside its namespace


def _ip(*args: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, text=True)


def available() -> str | None:
    """None where namespaces, veth pairs and netem work; else why not."""
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "iproute2 (ip, tc) is not installed"
    name = f"dsprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create network namespaces here: {getattr(exc, 'stderr', exc)}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def netem_missing() -> str | None:
    """None where `tc netem` (delay, loss) works; else why not (some kernels build without sch_netem)."""
    name = f"dsprobe{secrets.token_hex(3)}"
    try:
        _ip("netns", "add", name)
        result = subprocess.run(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem",
                                 "delay", "1ms"], capture_output=True, text=True)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None if result.returncode == 0 else f"tc netem does not work here: {result.stderr.strip()}"


@dataclass
class Host:
    name: str
    namespace: str
    ip: str
    outer: str  # the veth end on the bridge, in the test's namespace

    @property
    def prefix(self) -> list[str]:
        """Prepend to a command line to run it on this host (its PID is the command's: exec, no fork)."""
        return ["ip", "netns", "exec", self.namespace]

    def link(self, up: bool) -> None:
        _ip("link", "set", DEVICE, "up" if up else "down", namespace=self.namespace)

    def shape(self, qdisc: str | None) -> None:
        """Shape what this host sends with a root qdisc ('netem delay 30ms loss 3%', 'tbf rate 20mbit
        burst 32kbit latency 400ms'); None removes it."""
        base = ["ip", "netns", "exec", self.namespace, "tc", "qdisc"]
        subprocess.run([*base, "del", "dev", DEVICE, "root"], capture_output=True)
        if qdisc:
            subprocess.run([*base, "add", "dev", DEVICE, "root", *qdisc.split()], check=True, capture_output=True)


class Network:
    def __init__(self) -> None:
        self.tag = secrets.token_hex(2)
        self.subnet = f"10.213.{secrets.randbelow(250) + 1}"
        self.bridge = f"dsbr{self.tag}"
        self.hosts: list[Host] = []
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")

    @property
    def gateway_ip(self) -> str:
        """This (the test's) side of the bridge."""
        return f"{self.subnet}.1"

    def add_host(self, name: str) -> Host:
        index = len(self.hosts) + 2
        host = Host(name, f"ds{self.tag}{name}", f"{self.subnet}.{index}", f"dsv{self.tag}{index}")
        _ip("netns", "add", host.namespace)
        self.hosts.append(host)
        _ip("link", "add", host.outer, "type", "veth", "peer", "name", f"dsp{self.tag}{index}")
        _ip("link", "set", f"dsp{self.tag}{index}", "netns", host.namespace)
        _ip("link", "set", f"dsp{self.tag}{index}", "name", DEVICE, namespace=host.namespace)
        _ip("addr", "add", f"{host.ip}/24", "dev", DEVICE, namespace=host.namespace)
        _ip("link", "set", DEVICE, "up", namespace=host.namespace)
        _ip("link", "set", "lo", "up", namespace=host.namespace)
        _ip("link", "set", host.outer, "master", self.bridge)
        _ip("link", "set", host.outer, "up")
        return host

    def close(self) -> None:
        for host in self.hosts:
            subprocess.run(["ip", "link", "del", host.outer], capture_output=True)
            subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
