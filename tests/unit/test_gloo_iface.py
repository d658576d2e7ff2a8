"""gloo's interface before a multi-node rendezvous (mptk.parallel.env): the choice is pure, fed
here with the networks of the CI's two namespace nodes and of broken hosts."""

from __future__ import annotations

import os

import pytest

from mptk.parallel import env
from mptk.parallel.env import DistEnv, HostNet, choose_gloo_ifname

# Node 1 of .ci/slurm_up.sh's two: hostname "vm" -> 127.0.0.1, eth0 10.77.0.1, and the master
# is this node (its route to itself goes through lo; its source address is eth0's).
N1 = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.77.0.1", "fe80::807c:d9ff:feb9:df72"]}
N2 = {"lo": ["127.0.0.1", "::1"], "eth0": ["10.77.0.2"]}


def net(*, host_addrs=("127.0.0.1",), master_ips=("10.77.0.1",), source_ip="10.77.0.1",
        interfaces=None) -> HostNet:
    return HostNet(hostname="vm", host_addrs=list(host_addrs), master_addr="mptk-n1",
                   master_ips=list(master_ips), source_ip=source_ip,
                   interfaces=N1 if interfaces is None else interfaces)


def test_master_node_picks_the_interface_holding_the_route_source():
    choice = choose_gloo_ifname({}, net())
    assert choice.ifname == "eth0"
    assert choice.line == ("mptk: GLOO_SOCKET_IFNAME=eth0: hostname vm resolves to 127.0.0.1 (loopback "
                           "for gloo); eth0 (10.77.0.1) carries the route to MASTER_ADDR=mptk-n1 (10.77.0.1)")


def test_other_node_picks_its_own_interface():
    assert choose_gloo_ifname({}, net(source_ip="10.77.0.2", interfaces=N2)).ifname == "eth0"


def test_two_nics_the_one_on_the_route_wins():
    nics = {"lo": ["127.0.0.1"], "eth0": ["192.0.2.2"], "ib0": ["10.1.0.7"]}
    assert choose_gloo_ifname({}, net(master_ips=["10.1.0.1"], source_ip="10.1.0.7",
                                      interfaces=nics)).ifname == "ib0"


def test_ipv6_route():
    nics = {"lo": ["::1"], "eth0": ["fd00::2"]}
    choice = choose_gloo_ifname({}, net(host_addrs=["::1"], master_ips=["fd00::1"],
                                        source_ip="fd00:0::2", interfaces=nics))
    assert choice.ifname == "eth0"


@pytest.mark.parametrize("why, env_vars, host", [
    ("the user's value wins", {"GLOO_SOCKET_IFNAME": "ib0"}, net()),
    ("hostname already binds off loopback", {}, net(host_addrs=["10.77.0.1"])),
    ("one node: master on loopback", {}, net(master_ips=["127.0.0.1"], source_ip="127.0.0.1")),
])
def test_nothing_to_do(why, env_vars, host):
    assert choose_gloo_ifname(env_vars, host) == env.GlooChoice(ifname=None, line=None), why


@pytest.mark.parametrize("host_addrs", [[], ["127.0.1.1"], ["10.9.9.9"]],
                         ids=["unresolved", "127.0.1.1", "not-this-node"])
def test_hostname_that_gloo_cannot_use_off_loopback(host_addrs):
    """Unresolved, loopback, or an address no interface has (gloo then falls back to 127.0.0.1)."""
    assert choose_gloo_ifname({}, net(host_addrs=host_addrs)).ifname == "eth0"


def test_no_route_names_the_variable_and_the_interfaces():
    choice = choose_gloo_ifname({}, net(source_ip=None))
    assert choice.ifname is None
    assert choice.line == ("mptk: warning: hostname vm resolves to 127.0.0.1, so gloo would bind to "
                           "loopback, and no interface of the route to MASTER_ADDR=mptk-n1 (10.77.0.1) was "
                           "found: set GLOO_SOCKET_IFNAME (cluster.env.GLOO_SOCKET_IFNAME=<nic>) to one "
                           "of: lo, eth0")


def test_route_source_on_no_interface_and_unresolved_master():
    assert choose_gloo_ifname({}, net(source_ip="10.5.5.5")).ifname is None
    choice = choose_gloo_ifname({}, net(master_ips=[], source_ip=None))
    assert choice.ifname is None and "MASTER_ADDR=mptk-n1 (unresolved)" in (choice.line or "")


def test_parse_if_inet6():
    text = ("00000000000000000000000000000001 01 80 10 80       lo\n"
            "fe80000000000000807cd9fffeb9df72 06 40 20 80     eth0\n"
            "fd000000000000000000000000000002 04 40 00 82     eth0\n")
    assert env.parse_if_inet6(text) == {"lo": ["::1"], "eth0": ["fe80::807c:d9ff:feb9:df72", "fd00::2"]}


def test_ensure_sets_the_variable_and_prints_once_per_node(monkeypatch, capsys):
    monkeypatch.setattr(env, "probe", lambda addr, port: net())
    monkeypatch.setattr(env, "_PRINTED", set())
    environ: dict[str, str] = {}
    rank1 = DistEnv(rank=1, local_rank=1, world_size=4, master_addr="mptk-n1", master_port=1,
                    launcher="slurm")
    assert env.ensure_gloo_ifname(rank1, environ) == "eth0"
    assert environ == {"GLOO_SOCKET_IFNAME": "eth0"} and capsys.readouterr().err == ""
    environ.clear()
    rank0 = DistEnv(rank=0, local_rank=0, world_size=4, master_addr="mptk-n1", master_port=1,
                    launcher="slurm")
    env.ensure_gloo_ifname(rank0, environ)
    assert capsys.readouterr().err.startswith("mptk: GLOO_SOCKET_IFNAME=eth0: ")
    assert env.ensure_gloo_ifname(rank0, environ) is None and capsys.readouterr().err == ""


def test_probe_of_this_machine_finds_loopback():
    """The stdlib probes themselves: loopback resolves, routes via 127.0.0.1, and lo has it."""
    host = env.probe("127.0.0.1", 29500)
    assert host.master_ips == ["127.0.0.1"] and host.source_ip == "127.0.0.1"
    assert env.interface_of("127.0.0.1", host.interfaces) is not None


def test_no_interface_warning_is_printed_once(monkeypatch, capsys):
    monkeypatch.setattr(env, "probe", lambda addr, port: net(source_ip=None))
    monkeypatch.setattr(env, "_PRINTED", set())
    rank0 = DistEnv(rank=0, local_rank=0, world_size=4, master_addr="mptk-n1", master_port=1,
                    launcher="slurm")
    environ: dict[str, str] = {}
    assert env.ensure_gloo_ifname(rank0, environ) is None and environ == {}
    assert env.ensure_gloo_ifname(rank0, environ) is None
    assert capsys.readouterr().err.count("mptk: warning: hostname vm resolves to") == 1


def test_detect_only_reads(monkeypatch):
    """Reading the environment sets nothing: the rank's entry (mptk-train under srun/torchrun)
    settles gloo's interface right before its rendezvous."""
    monkeypatch.setattr(env, "probe", lambda addr, port: net())
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    for name, value in {"RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "mptk-n1", "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    assert env.detect() == DistEnv(rank=1, local_rank=0, world_size=4, master_addr="mptk-n1",
                                   master_port=1, launcher="torchrun")
    assert "GLOO_SOCKET_IFNAME" not in os.environ
