#!/usr/bin/env bash
# Bring up Slurm on this machine (Debian's slurm-wlm): munge, slurmctld and slurmd, all as root,
# the node declared with more CPUs than it has (SlurmdParameters=config_overrides) so a 4-task
# gloo job fits on a 2-core box. Idempotent: with everything up it returns at once.
#
#   bash .ci/slurm_up.sh                  # one node (`hostname -s`), partition "debug" (default)
#   SLURM_NODES=2 bash .ci/slurm_up.sh    # plus "nodes" mptk-n1, mptk-n2 in partition "two"
#   SLURM_CPUS=16 bash .ci/slurm_up.sh    # CPUs declared for the main node (default 8)
#
# Two nodes: this Slurm build runs one slurmd per network stack, so each extra node is a network
# namespace (mptk-n1, mptk-n2: 10.77.0.1/.2 on bridge mptkbr0, host side 10.77.0.254, names in
# /etc/hosts) running its own slurmd; slurmctld is then addressed as 10.77.0.254 so the
# namespaces reach it. Tasks there see an interface "eth0" (mptk picks it for gloo: the route to MASTER_ADDR).
#
# Why these settings (see shared/STACK_NOTES.md, section Slurm):
#   ProctrackType=proctrack/linuxproc  no cgroup v1/v2 delegation needed inside a container
#   TaskPlugin=task/none               no cpuset/affinity plugin (no cgroup.conf)
#   SlurmdParameters=config_overrides  trust slurm.conf's CPUs= over the 2 detected cores
#   ReturnToService=2                  a node that was DOWN comes back when slurmd registers
#   no accounting (sacct unavailable)  tests read `scontrol show job` and the job's output file
set -euo pipefail

CPUS=${SLURM_CPUS:-8}
NODES=${SLURM_NODES:-1}
NODE=$(hostname -s)
CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm
BRIDGE=mptkbr0
NET=10.77.0
HOST_ADDR=$NET.254
EXTRA_CPUS=4

log() { echo "slurm_up: $*"; }

extra_nodes() {  # SLURM_NODES=N (N > 1): namespace nodes mptk-n1 .. mptk-nN
    local i
    ((NODES > 1)) || return 0
    for ((i = 1; i <= NODES; i++)); do echo "mptk-n$i"; done
}

node_ready() {  # node_ready NAME
    local state
    state=$(timeout 10 sinfo -h -N -n "$1" -o '%t' 2>/dev/null | head -1) || return 1
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]
}

all_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local n
    for n in "$NODE" $(extra_nodes); do node_ready "$n" || return 1; done
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null; then
        return
    fi
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

render_conf() {
    local ctld=$NODE n i=0
    if ((NODES > 1)); then ctld="$NODE($HOST_ADDR)"; fi
    cat <<CONF
# Written by .ci/slurm_up.sh: $NODES node(s), everything as root, no cgroups, no accounting.
ClusterName=mptk
SlurmctldHost=$ctld
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobRequeue=1
KillWait=30
MinJobAge=3600
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    for n in $(extra_nodes); do
        i=$((i + 1))
        echo "NodeName=$n NodeAddr=$NET.$i CPUs=$EXTRA_CPUS State=UNKNOWN"
    done
    if ((NODES > 1)); then
        echo "PartitionName=two Nodes=$(extra_nodes | paste -sd,) MaxTime=INFINITE State=UP OverSubscribe=NO"
    fi
}

install_conf() {  # install_conf RENDERED_FILE; sets CONF_CHANGED
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG" /run/slurm
    CONF_CHANGED=0
    if ! cmp -s "$1" "$CONF"; then
        cp "$1" "$CONF"
        CONF_CHANGED=1
    fi
    chmod 644 "$CONF"
}

setup_netns() {
    ((NODES > 1)) || return 0
    if ! ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link add "$BRIDGE" type bridge
        ip addr add "$HOST_ADDR/24" dev "$BRIDGE"
    fi
    ip link set "$BRIDGE" up
    local n i=0
    for n in $(extra_nodes); do
        i=$((i + 1))
        setup_one_ns "$n" "$NET.$i" "veth-$i"
        grep -q "^$NET.$i $n\$" /etc/hosts || echo "$NET.$i $n" >>/etc/hosts
    done
}

setup_one_ns() {  # setup_one_ns NAME ADDR HOST_SIDE_VETH
    ip netns list | grep -qw "^$1" || ip netns add "$1"
    if ! ip link show "$3" >/dev/null 2>&1; then
        ip link add "$3" type veth peer name "$3-ns"
        ip link set "$3" master "$BRIDGE"
        ip link set "$3-ns" netns "$1"
        ip netns exec "$1" ip link set "$3-ns" name eth0
        ip netns exec "$1" ip addr add "$2/24" dev eth0
    fi
    ip link set "$3" up
    ip netns exec "$1" ip link set lo up
    ip netns exec "$1" ip link set eth0 up
}

netns_or_one_node() {  # the namespace nodes, or (when that fails) NODES=1
    local ok
    set +e
    (set -e; setup_netns)
    ok=$?
    set -e
    if ((ok != 0)); then
        log "could not set up network namespaces: one node only (the two-node tests will skip)"
        NODES=1
    fi
}

start_munge() {
    if pgrep -x munged >/dev/null; then return; fi
    mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
    chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
    chmod 700 /etc/munge && chmod 400 /etc/munge/munge.key && chmod 755 /run/munge
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
}

stop_if_changed() {
    [[ "$CONF_CHANGED" == 1 ]] || return 0
    # A new slurm.conf: stop running daemons so they start again with it.
    local pid i
    for pid in $(pgrep -x slurmd || true) $(pgrep -x slurmctld || true); do
        kill "$pid" || true
    done
    for i in $(seq 1 30); do
        pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0
        sleep 1
    done
    log "slurm daemons did not stop within 30 s"
    return 1
}

slurmd_running() {  # slurmd_running NODENAME
    [[ -f "/run/slurm/slurmd-$1.pid" ]] && kill -0 "$(cat "/run/slurm/slurmd-$1.pid")" 2>/dev/null
}

start_daemons() {
    if ! pgrep -x slurmctld >/dev/null; then
        log "starting slurmctld"
        /usr/sbin/slurmctld -i
    fi
    if ! slurmd_running "$NODE"; then
        log "starting slurmd for $NODE ($CPUS CPUs declared)"
        /usr/sbin/slurmd -N "$NODE"
    fi
    local n
    for n in $(extra_nodes); do
        slurmd_running "$n" && continue
        log "starting slurmd for $n in network namespace $n ($EXTRA_CPUS CPUs declared)"
        mkdir -p "/var/spool/slurmd/$n"
        # nsenter, not `ip netns exec`: that remounts /sys, hiding /sys/fs/cgroup from slurmd
        nsenter --net="/run/netns/$n" /usr/sbin/slurmd -N "$n"
    done
}

wait_idle() {
    local i n
    for i in $(seq 1 60); do
        if all_ready; then
            log "up: $(sinfo -h -N -o '%N/%P %t cpus=%c' | paste -sd' ')"
            return 0
        fi
        if ((i == 10)); then
            for n in "$NODE" $(extra_nodes); do
                scontrol update nodename="$n" state=resume >/dev/null 2>&1 || true
            done
        fi
        sleep 1
    done
    log "nodes did not become idle; sinfo says:"
    sinfo -N -l || true
    tail -n 20 "$LOG"/*.log || true
    return 1
}

main() {
    RENDERED=$(mktemp)
    trap 'rm -f "$RENDERED"' EXIT
    local rendered=$RENDERED
    render_conf >"$rendered"
    if cmp -s "$rendered" "$CONF" && all_ready; then
        log "already up ($(sinfo -h -N -o '%N %t' | paste -sd' '))"
        return 0
    fi
    install_packages
    netns_or_one_node  # not in a condition: errexit must stay on inside it
    render_conf >"$rendered"
    install_conf "$rendered"
    start_munge
    stop_if_changed
    start_daemons
    wait_idle
}

main "$@"
