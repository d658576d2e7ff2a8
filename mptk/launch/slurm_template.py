"""The sbatch script text that :mod:`mptk.launch.slurm` fills in.

Placeholders are ``@@{name}`` (a :class:`string.Template` with delimiter ``@@``), so bash's own
``$VAR``, ``"$@"`` and ``${ARR[@]}`` need no escaping. Every placeholder is required:
``substitute`` raises on a missing one.
"""

from __future__ import annotations

import string


class ScriptTemplate(string.Template):
    delimiter = "@@"


JOB_SCRIPT = ScriptTemplate("""\
#!/bin/bash
# @@{title}
# Rendered by mptk.launch.slurm from the typed config: cluster profile fabric=@@{fabric},
# @@{nodes} node(s) x @@{tasks_per_node} task(s), one training process per task (per GPU).
# @@{usage}
@@{directives}
#
# Requeue protocol: the training exits with @@{requeue_code} (mptk.exitcodes.REQUEUE_EXIT_CODE)
# after saving a checkpoint, e.g. on the SIGUSR1 that --signal sends before the time limit;
# this script then runs `scontrol requeue`, up to cluster.requeue_max=@@{requeue_max} times
# (SLURM_RESTART_COUNT counts requeues, preemptions included); the requeued job resumes
# from the checkpoint in the same run dir.
set -uo pipefail

REQUEUE_EXIT_CODE=@@{requeue_code}
REQUEUE_MAX=@@{requeue_max}
RESTARTS=${SLURM_RESTART_COUNT:-0}
MPTK_PYTHON=${MPTK_PYTHON:-@@{python}}
RUN_DIR=@@{run_dir}
OVERRIDES=(@@{overrides})
@@{setup}
# Rendezvous for torch.distributed: the allocation's first host, and a port derived from the job
# id so two jobs sharing a node do not collide (the rule of mptk.parallel.env.slurm_master_port).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$((15000 + SLURM_JOB_ID % 20000))
export MASTER_ADDR MASTER_PORT

@@{environment}

@@{flight_recorder}

@@{nsys}

if ((RESTARTS > REQUEUE_MAX)); then
    echo "mptk: job $SLURM_JOB_ID was requeued $RESTARTS times, more than" \\
        "cluster.requeue_max=$REQUEUE_MAX; stopping" >&2
    exit 1
fi
echo "mptk: job $SLURM_JOB_ID (restart $RESTARTS/$REQUEUE_MAX): $SLURM_NTASKS tasks on" \\
    "$SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], master $MASTER_ADDR:$MASTER_PORT," \\
    "run dir $RUN_DIR"

# One task per GPU, started by srun itself (no torchrun inside srun): each task takes its rank
# from SLURM_PROCID. --wait: once one task has exited, end the others after that many seconds
# rather than leave them blocked in a collective. (Not --kill-on-bad-exit: it would kill the
# other ranks as soon as rank 0 exits with the requeue code, and srun would report the kill.)
srun --wait=@@{exit_wait}@@{container} \\
    "${NSYS[@]}" "$MPTK_PYTHON" -m mptk.cli.train launcher=slurm "hydra.run.dir=$RUN_DIR" "${OVERRIDES[@]}" "$@"
rc=$?

if ((rc == REQUEUE_EXIT_CODE)); then
    if ((RESTARTS < REQUEUE_MAX)); then
        echo "mptk: training saved and asked to be requeued (exit $rc);" \\
            "requeue $((RESTARTS + 1))/$REQUEUE_MAX"
        # Slurm ends this run of the script here and starts it again later.
        scontrol requeue "$SLURM_JOB_ID" && exit 0
        echo "mptk: scontrol requeue failed; submit again to resume from $RUN_DIR" >&2
    else
        echo "mptk: training asked to be requeued but cluster.requeue_max=$REQUEUE_MAX" \\
            "requeues are used up; submit again to resume from $RUN_DIR" >&2
    fi
fi
exit $rc
""")
"""The whole sbatch script."""

STATIC_ENV = ScriptTemplate("""\
# Fabric variables: cluster.env@@{debug_note}.
@@{exports}""")
"""Environment block of a script rendered by ``mptk-submit``: the profile's values, baked in."""

JOB_ENV = """\
# Fabric variables (cluster.env, plus cluster.debug_env when cluster.debug=true) of the config
# these overrides compose, and a preflight on the batch host: a bad config is one line here
# instead of one per task.
JOB_ENV=$("$MPTK_PYTHON" -m mptk.cli.submit --job-env launcher=slurm "${OVERRIDES[@]}" "$@") || exit $?
eval "$JOB_ENV"
"""
"""Environment block of the checked-in examples: computed in the job from the overrides."""

FLIGHT_RECORDER = ScriptTemplate("""\
# torch's flight recorder: every rank keeps its last collectives in memory. A collective timeout
# (NCCL's watchdog) or mptk's hang watchdog (debug.hang_timeout_s) writes them to
# $RUN_DIR/flight_recorder/rank_<r>; which rank waits in which collective is then readable side by
# side (NCCL: torchfrtrace "$RUN_DIR/flight_recorder" -j). Values set before sbatch win.
mkdir -p "$RUN_DIR/flight_recorder"
@@{exports}""")
"""Flight recorder block (names and values from :func:`mptk.log.watchdog.flight_recorder_env`)."""

NSYS = ScriptTemplate("""\
# Nsight Systems, opt-in: cluster.nsys=true (or MPTK_NSYS=1 in sbatch's environment) runs every task
# under nsys with --capture-range=cudaProfilerApi: mptk calls cudaProfilerStart/Stop at the edges
# of the profile.start_step..end_step window, so each rank in profile.ranks records exactly that
# window (the others write no report). One report per rank: $RUN_DIR/nsys/rank_<r>.nsys-rep.
export MPTK_NSYS=${MPTK_NSYS:-0}
NSYS=()
if [[ "$MPTK_NSYS" != 0 ]]; then
@@{check}    mkdir -p "$RUN_DIR/nsys"
    NSYS=(nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop
        --trace=cuda,nvtx,osrt,cublas --sample=none --cpuctxsw=none --force-overwrite=true
        --output="$RUN_DIR/nsys/rank_%q{SLURM_PROCID}")
fi""")
"""The nsys wrapper block; ``check`` is the host-side ``nsys`` lookup (none in a container,
where nsys comes from the image)."""

NSYS_CHECK = """\
    command -v nsys > /dev/null || { echo "mptk: error: MPTK_NSYS=$MPTK_NSYS (cluster.nsys) but" \\
        "nsys is not on PATH; add e.g. 'module load nsight-systems' to cluster.setup, or set" \\
        "cluster.nsys=false" >&2; exit 2; }
"""
