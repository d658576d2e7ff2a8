"""Who am I in the job: rank, world and rendezvous from torchrun's or Slurm's environment,
and the network interface gloo binds to when the hostname would put it on loopback."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from mptk.config.checks import slurm_rank_task


@dataclass(frozen=True, slots=True)
class DistEnv:
    """This process's place in the job."""

    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str
    """``torchrun``, ``slurm`` or ``spawn``."""


def from_torchrun(env: Mapping[str, str]) -> Optional[DistEnv]:
    """torchrun (and any launcher that sets RANK/WORLD_SIZE/MASTER_*)."""
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    return DistEnv(rank=int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", 0)),
                   world_size=int(env["WORLD_SIZE"]),
                   master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                   master_port=int(env.get("MASTER_PORT", 29500)), launcher="torchrun")


def slurm_master_addr(env: Mapping[str, str]) -> str:
    """First host of the job's node list (``scontrol show hostnames``)."""
    if "MASTER_ADDR" in env:
        return env["MASTER_ADDR"]
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                         text=True, check=True).stdout
    return out.split()[0]


def slurm_master_port(env: Mapping[str, str]) -> int:
    """A port derived from the job id, so concurrent jobs on one node do not collide."""
    if "MASTER_PORT" in env:
        return int(env["MASTER_PORT"])
    return 15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000


def from_slurm(env: Mapping[str, str]) -> Optional[DistEnv]:
    """One task per device under ``srun`` (a job step: SLURM_STEP_ID is set); not the one task
    of a submitit sweep job, which spawns its ranks like a bare ``mptk-train``."""
    if not slurm_rank_task(env):
        return None
    return DistEnv(rank=int(env["SLURM_PROCID"]), local_rank=int(env.get("SLURM_LOCALID", 0)),
                   world_size=int(env["SLURM_NTASKS"]), master_addr=slurm_master_addr(env),
                   master_port=slurm_master_port(env), launcher="slurm")


def detect(env: Optional[Mapping[str, str]] = None) -> Optional[DistEnv]:
    """The launcher's environment (this process's when ``env`` is None), or ``None`` when
    started bare (mptk spawns the workers). Reads only: the rank's entry settles gloo's
    interface before its rendezvous (:func:`ensure_gloo_ifname`)."""
    source = os.environ if env is None else env
    return from_torchrun(source) or from_slurm(source)


GLOO_IFNAME = "GLOO_SOCKET_IFNAME"


@dataclass(frozen=True, slots=True)
class HostNet:
    """What this node's network looks like from the point of view of gloo's rendezvous."""

    hostname: str
    host_addrs: Sequence[str]
    """The addresses the hostname resolves to (gloo binds to the first usable one)."""
    master_addr: str
    master_ips: Sequence[str]
    """The addresses ``MASTER_ADDR`` resolves to."""
    source_ip: Optional[str]
    """The local address of the route to the first of ``master_ips`` (None: no route found)."""
    interfaces: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Interface name -> its addresses (every interface, with or without an address)."""


def _ip(text: str) -> Optional[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return ipaddress.ip_address(text.split("%")[0])
    except ValueError:
        return None


def all_loopback(addrs: Sequence[str]) -> bool:
    """True when every address is a loopback one (or there is none)."""
    ips = [_ip(a) for a in addrs]
    return all(ip is None or ip.is_loopback for ip in ips)


def hostname_binds_off_loopback(net: HostNet) -> bool:
    """Whether gloo, left to the hostname, binds to an address other nodes can reach: one that
    is not loopback and (when the interfaces are known) belongs to this node; otherwise gloo
    falls back to 127.0.0.1."""
    local = {_ip(a) for addrs in net.interfaces.values() for a in addrs}
    known = bool(local - {None})
    return any(ip is not None and not ip.is_loopback and (not known or ip in local)
               for ip in map(_ip, net.host_addrs))


def interface_of(ip: str, interfaces: Mapping[str, Sequence[str]]) -> Optional[str]:
    """The interface holding address ``ip``, or None."""
    want = _ip(ip)
    for name, addrs in interfaces.items():
        if want is not None and any(_ip(a) == want for a in addrs):
            return name
    return None


@dataclass(frozen=True, slots=True)
class GlooChoice:
    """The interface to set (None: leave gloo alone or nothing found) and the line to print."""

    ifname: Optional[str]
    line: Optional[str]


def choose_gloo_ifname(env: Mapping[str, str], net: HostNet) -> GlooChoice:
    """Pure: which ``GLOO_SOCKET_IFNAME`` this node needs before the rendezvous.

    Nothing when the variable is set, when the hostname already binds off loopback, or when
    ``MASTER_ADDR`` is itself loopback (one node: loopback reaches every rank). Otherwise the
    interface that carries the route to ``MASTER_ADDR`` (by its source address: on the master's
    node the route to itself goes through ``lo``, its address does not)."""
    if env.get(GLOO_IFNAME) or hostname_binds_off_loopback(net):
        return GlooChoice(ifname=None, line=None)
    if net.master_ips and all_loopback(net.master_ips):
        return GlooChoice(ifname=None, line=None)
    master = f"MASTER_ADDR={net.master_addr} ({', '.join(net.master_ips) or 'unresolved'})"
    why = f"hostname {net.hostname} resolves to {', '.join(net.host_addrs) or 'nothing'}"
    name = interface_of(net.source_ip, net.interfaces) if net.source_ip else None
    if name is None:
        present = ", ".join(net.interfaces) or "none found"
        return GlooChoice(ifname=None, line=(
            f"mptk: warning: {why}, so gloo would bind to loopback, and no interface of the route "
            f"to {master} was found: set {GLOO_IFNAME} (cluster.env.{GLOO_IFNAME}=<nic>) to one of: "
            f"{present}"))
    return GlooChoice(ifname=name, line=(
        f"mptk: {GLOO_IFNAME}={name}: {why} (loopback for gloo); {name} ({net.source_ip}) carries "
        f"the route to {master}"))


def resolve(host: str) -> list[str]:
    """The addresses ``host`` resolves to, in resolver order without repeats ([] if none)."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def route_source(ip: str, port: int) -> Optional[str]:
    """This node's source address for packets to ``ip`` (a UDP connect sends nothing)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((ip, port or 9))
            return str(sock.getsockname()[0])
    except OSError:
        return None


def _ipv4_of(name: str) -> list[str]:
    import fcntl
    import struct

    siocgifaddr = 0x8915
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            raw = fcntl.ioctl(sock.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
        except OSError:  # no IPv4 address on it
            return []
    return [socket.inet_ntoa(raw[20:24])]


def parse_if_inet6(text: str) -> dict[str, list[str]]:
    """Interface -> IPv6 addresses from ``/proc/net/if_inet6`` (hex address, ..., name)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 6 and len(parts[0]) == 32:
            out.setdefault(parts[5], []).append(str(ipaddress.IPv6Address(int(parts[0], 16))))
    return out


def interfaces() -> dict[str, list[str]]:
    """Every interface of this node with its IPv4 and IPv6 addresses (stdlib, Linux)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    try:
        with open("/proc/net/if_inet6") as f:
            v6 = parse_if_inet6(f.read())
    except OSError:
        v6 = {}
    return {name: [*_ipv4_of(name), *v6.get(name, [])] for name in names}


def probe(master_addr: str, master_port: int) -> HostNet:
    """This node's :class:`HostNet` (name resolution, the route to the master, interfaces)."""
    hostname = socket.gethostname()
    master_ips = resolve(master_addr)
    return HostNet(hostname=hostname, host_addrs=resolve(hostname), master_addr=master_addr,
                   master_ips=master_ips,
                   source_ip=route_source(master_ips[0], master_port) if master_ips else None,
                   interfaces=interfaces())


def ensure_gloo_ifname(dist: DistEnv, environ: Optional[MutableMapping[str, str]] = None) -> Optional[str]:
    """Set ``GLOO_SOCKET_IFNAME`` in this process when gloo would otherwise bind to loopback in
    a job whose master is another address; one line per node (local rank 0) says what was done,
    or names the variable and the interfaces when nothing fits. Returns the interface set."""
    environ = os.environ if environ is None else environ
    if environ.get(GLOO_IFNAME):
        return None
    choice = choose_gloo_ifname(environ, probe(dist.master_addr, dist.master_port))
    if choice.ifname:
        environ[GLOO_IFNAME] = choice.ifname
    if choice.line and dist.local_rank == 0 and choice.line not in _PRINTED:
        _PRINTED.add(choice.line)  # once per process, whoever calls again
        print(choice.line, file=sys.stderr, flush=True)
    return choice.ifname


_PRINTED: set[str] = set()
