"""Where this node is on the network, for a job across machines: the address the other nodes reach it
by, the interface collectives use, and whether it hosts the rendezvous store.

Left to themselves, torchrun and gloo guess from the hostname, which on many machines resolves to
127.0.0.1: workers are then told MASTER_ADDR=localhost, gloo binds loopback, and no node believes it
hosts the store, and the job hangs. So the launcher derives each value from the route to the
rendezvous host (or takes it from the config), passes it on explicitly, and logs it on every node.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import psutil

from foundry.pretrain.config import LaunchConfig


class NetworkError(ValueError):
    """The rendezvous host or this node's address or interface cannot be found; the message says which."""


@dataclass(frozen=True)
class NodeNetwork:
    rendezvous: str  # HOST:PORT as configured
    rendezvous_ip: str
    address: str  # this node's address, as the others reach it
    interface: str  # the network interface gloo and NCCL use
    hosts_store: bool | None  # None: let torchrun decide (all nodes on one machine, over loopback)

    def describe(self) -> str:
        hosting = {True: "yes", False: "no", None: "torchrun decides (loopback)"}[self.hosts_store]
        return (f"node address {self.address} on interface {self.interface} | rendezvous {self.rendezvous} "
                f"({self.rendezvous_ip}), store hosted here: {hosting}")

    def torchrun_args(self) -> list[str]:
        args = [f"--local-addr={self.address}"]
        if self.hosts_store is not None:
            args.append(f"--rdzv-conf=is_host={int(self.hosts_store)}")
        return args

    def env(self) -> dict[str, str]:
        """For the workers: collectives on this interface; FOUNDRY_NODE_ADDR names the node in error messages."""
        return {"GLOO_SOCKET_IFNAME": self.interface, "NCCL_SOCKET_IFNAME": self.interface,
                "FOUNDRY_NODE_ADDR": self.address}


def resolve(launch: LaunchConfig, first_node: bool | None = None) -> NodeNetwork:
    """This node's view of a multi-node job (launch.rdzv_endpoint set). `first_node`: whether this node hosts the
    rendezvous store, when the scheduler says so (SLURM's node 0); None: this node's address decides."""
    host, _, port = launch.rdzv_endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise NetworkError(f"launch.rdzv_endpoint={launch.rdzv_endpoint!r} is not HOST:PORT (under SLURM: the batch "
                           f"script found no NodeAddr for the first node in `scontrol show node`)")
    try:
        rendezvous_ip = socket.gethostbyname(host)
    except OSError as e:
        raise NetworkError(f"launch.rdzv_endpoint host {host!r} does not resolve ({e.strerror}): use its IP "
                           f"address") from None
    loopback = ipaddress.ip_address(rendezvous_ip).is_loopback
    if launch.interface and launch.interface not in psutil.net_if_addrs():
        raise NetworkError(f"launch.interface={launch.interface!r} is not an interface of this node: choose one of "
                           f"{', '.join(sorted(psutil.net_if_addrs()))}")
    if loopback and first_node is not None and not (launch.node_addr or launch.interface):
        # The first node of a real allocation whose name resolves to itself (Debian's 127.0.1.1): the route to it
        # says nothing about the address the other nodes use.
        raise NetworkError(f"the rendezvous host {host!r} is {rendezvous_ip} (loopback) on this node, which the other "
                           f"nodes cannot reach: set launch.interface to the network the nodes share (one of "
                           f"{', '.join(sorted(psutil.net_if_addrs()))})")
    address = launch.node_addr or (address_of(launch.interface) if launch.interface
                                   else source_address(rendezvous_ip, int(port)))
    interface = launch.interface or interface_of(address)
    if first_node is None and not loopback:
        first_node = address == rendezvous_ip
    return NodeNetwork(launch.rdzv_endpoint, rendezvous_ip, address, interface, first_node)


def source_address(ip: str, port: int) -> str:
    """The address this node sends from to reach `ip`: the kernel's route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, port))
        except OSError as e:
            raise NetworkError(f"no route from this node to the rendezvous host {ip} ({e.strerror}): check the "
                               f"network, or set launch.node_addr and launch.interface") from None
        return s.getsockname()[0]


def address_of(interface: str) -> str:
    for a in psutil.net_if_addrs()[interface]:
        if a.family == socket.AF_INET:
            return a.address
    raise NetworkError(f"launch.interface={interface!r} has no IPv4 address: choose another, or set launch.node_addr")


def interface_of(address: str) -> str:
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return name
    raise NetworkError(f"no interface of this node has the address {address}: set launch.interface")
