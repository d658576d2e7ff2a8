#!/usr/bin/env bash
# Bring up a one-node Slurm on this machine (Debian's slurm-wlm): munge, slurmctld and slurmd,
# all as root, with the node declared with more CPUs than it has (SlurmdParameters=config_overrides)
# so a 4-task gloo job fits on a 2-core box. Idempotent: with everything up it returns at once.
#
#   bash .ci/slurm_up.sh            # install if needed, configure, start, wait for an idle node
#   SLURM_CPUS=16 bash .ci/slurm_up.sh
#
# Why these settings (see shared/STACK_NOTES.md, section Slurm):
#   ProctrackType=proctrack/linuxproc  no cgroup v1/v2 delegation needed inside a container
#   TaskPlugin=task/none               no cpuset/affinity plugin (no cgroup.conf)
#   SlurmdParameters=config_overrides  trust slurm.conf's CPUs= over the 2 detected cores
#   ReturnToService=2                  a node that was DOWN comes back when slurmd registers
#   no accounting (sacct unavailable)  tests read `scontrol show job` and the job's output file
set -euo pipefail

CPUS=${SLURM_CPUS:-8}
NODE=$(hostname -s)
CONF=/etc/slurm/slurm.conf
LOG=/var/log/slurm

log() { echo "slurm_up: $*"; }

node_ready() {
    command -v sinfo >/dev/null 2>&1 || return 1
    local state
    state=$(timeout 10 sinfo -h -N -n "$NODE" -o '%t' 2>/dev/null | head -1) || return 1
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]]
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

write_conf() {
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOG" /run/slurm
    local tmp
    tmp=$(mktemp)
    cat >"$tmp" <<CONF
# Written by .ci/slurm_up.sh: one node ($NODE), everything as root, no cgroups, no accounting.
ClusterName=mptk
SlurmctldHost=$NODE
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
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    if ! cmp -s "$tmp" "$CONF"; then
        mv "$tmp" "$CONF"
        CONF_CHANGED=1
    else
        rm -f "$tmp"
    fi
    chmod 644 "$CONF"
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

restart_if_changed() {
    [[ "${CONF_CHANGED:-0}" == 1 ]] || return 0
    # A new slurm.conf: stop running daemons so they start again with it.
    local pid
    for daemon in slurmd slurmctld; do
        for pid in $(pgrep -x "$daemon" || true); do kill "$pid" || true; done
    done
    sleep 1
}

start_daemons() {
    if ! pgrep -x slurmctld >/dev/null; then
        log "starting slurmctld"
        /usr/sbin/slurmctld -i
    fi
    if ! pgrep -x slurmd >/dev/null; then
        log "starting slurmd ($CPUS CPUs declared)"
        /usr/sbin/slurmd
    fi
}

wait_idle() {
    local i
    for i in $(seq 1 60); do
        if node_ready; then
            log "node $NODE is up: $(sinfo -h -N -n "$NODE" -o '%N %t cpus=%c')"
            return 0
        fi
        if (( i == 10 )); then
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
        fi
        sleep 1
    done
    log "node $NODE did not become idle; sinfo says:"
    sinfo -N -l || true
    tail -n 20 "$LOG/slurmctld.log" "$LOG/slurmd.log" || true
    return 1
}

main() {
    if node_ready && [[ -f "$CONF" ]] && grep -q "^NodeName=$NODE CPUs=$CPUS " "$CONF"; then
        log "already up ($(sinfo -h -N -n "$NODE" -o '%N %t cpus=%c'))"
        return 0
    fi
    install_packages
    CONF_CHANGED=0
    write_conf
    start_munge
    restart_if_changed
    start_daemons
    wait_idle
}

main "$@"
