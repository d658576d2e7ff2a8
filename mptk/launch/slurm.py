"""Render sbatch scripts from the typed config.

Two kinds, one template (:mod:`mptk.launch.slurm_template`):

* ``mptk-submit`` renders a job for one run: the allocation (``#SBATCH``) and the fabric
  variables come from ``cfg.cluster`` and are baked in, the run dir is absolute.
* The checked-in examples ``slurm/<name>.sbatch`` take Hydra overrides after the script name
  (``sbatch slurm/gpt.sbatch model=gpt_small``); they compute the fabric variables in the job
  from those overrides and run in ``outputs/slurm/<job name>-<job id>``. Regenerate them with
  ``python -m mptk.launch.slurm`` (a unit test fails while they are stale).

Under srun every task runs ``mptk-train`` once (no torchrun inside srun): Slurm starts
``cluster.tasks_per_node`` tasks per node, one per GPU.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from mptk.config.schema import ClusterConfig
from mptk.exitcodes import REQUEUE_EXIT_CODE
from mptk.launch.slurm_template import (
    FLIGHT_RECORDER,
    JOB_ENV,
    JOB_SCRIPT,
    NSYS,
    NSYS_CHECK,
    STATIC_ENV,
)
from mptk.log.watchdog import flight_recorder_env

REPO = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO / "slurm"
IN_CONTAINER_PYTHON = "python"
"""The interpreter inside a pyxis/enroot image (the host's venv path does not exist there)."""

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


@dataclass(frozen=True, slots=True)
class JobSpec:
    """Everything a script needs besides the template."""

    cluster: ClusterConfig
    overrides: tuple[str, ...]
    """Hydra overrides baked into the script (more may follow the script on sbatch's line)."""
    run_dir: str
    """A shell word: a quoted absolute path, or an expression evaluated in the job."""
    output: str
    """sbatch ``--output`` (``%j`` = job id, ``%x`` = job name)."""
    python: str
    """Default interpreter; ``$MPTK_PYTHON`` overrides it in the job."""
    title: str
    usage: str
    job_env: bool
    """Compute the fabric variables in the job (examples) instead of baking them in."""


@dataclass(frozen=True, slots=True)
class Example:
    """A checked-in script: ``slurm/<name>.sbatch``."""

    name: str
    overrides: tuple[str, ...]
    """Baked into the script; ``cluster.*`` ones also shape its ``#SBATCH`` allocation."""
    description: str


EXAMPLES = (
    Example("gpt", (), "GPT (megatron-core + DeepSpeed); default: the quick start, gpt_tiny tp=2 x dp=2"),
    Example("vit", ("experiment=vit_digits", "cluster.tasks_per_node=2"),
            "ViT on scikit-learn's 8x8 digits (experiment=vit_digits: 2 processes)"),
)


# --------------------------------------------------------------------------- checks


def problems(c: ClusterConfig) -> list[str]:
    """What Slurm would refuse or run wrongly, one line each (naming the field and the fix)."""
    out = [f"cluster.{name}({value}) must be >= {low}; {fix}" for name, value, low, fix in (
        ("nodes", c.nodes, 1, "ask for at least one node"),
        ("tasks_per_node", c.tasks_per_node, 1, "run at least one task (one per GPU) per node"),
        ("cpus_per_task", c.cpus_per_task, 1, "give every task a core"),
        ("gpus_per_node", c.gpus_per_node, 0, "use 0 for CPU tasks"),
        ("signal_grace_s", c.signal_grace_s, 0, "use 0 to send no SIGUSR1"),
        ("requeue_max", c.requeue_max, 0, "use 0 to never requeue"),
        ("exit_wait_s", c.exit_wait_s, 0, "use seconds to wait for the other tasks"),
    ) if value < low]
    return out + _gpu_problems(c) + _text_problems(c)


def _gpu_problems(c: ClusterConfig) -> list[str]:
    if c.gpus_per_node in (0, c.tasks_per_node) or c.gpus_per_node < 0:
        return []
    return [f"cluster.gpus_per_node({c.gpus_per_node}) != cluster.tasks_per_node({c.tasks_per_node}); "
            f"run one task per GPU: set tasks_per_node={c.gpus_per_node} (or gpus_per_node=0 for CPU tasks)"]


def _text_problems(c: ClusterConfig) -> list[str]:
    out = [f"cluster.env: {k!r} is not a shell variable name; use letters, digits and _"
           for k in {**c.env, **c.debug_env} if not _NAME.match(k)]
    if not _TIME.match(c.time):
        out.append(f"cluster.time({c.time!r}) is not a Slurm time; write [D-]HH:MM:SS, e.g. 04:00:00")
    if any(ch.isspace() for ch in c.job_name) or not c.job_name:
        out.append(f"cluster.job_name({c.job_name!r}) must be one word; e.g. mptk-gpt")
    if c.container_mounts and not c.container_image:
        out.append("cluster.container_mounts without cluster.container_image; set the image or drop the mounts")
    return out


# --------------------------------------------------------------------------- pieces


def cluster_env(c: ClusterConfig) -> dict[str, str]:
    """The profile's variables: ``env``, then ``debug_env`` on top when ``debug`` (a submitit
    sweep job sets these in its launcher before it spawns the ranks)."""
    return {**c.env, **(c.debug_env if c.debug else {})}


def fabric_env(c: ClusterConfig) -> dict[str, str]:
    """Variables every task gets: :func:`cluster_env`, and ``MPTK_NSYS=1`` when ``nsys`` (the
    script's nsys wrapper reads it)."""
    return {**cluster_env(c), **({"MPTK_NSYS": "1"} if c.nsys else {})}


def exports(env: dict[str, str]) -> str:
    """``export NAME=value`` lines, values shell-quoted."""
    return "\n".join(f"export {k}={shlex.quote(str(v))}" for k, v in env.items())


def sbatch_options(c: ClusterConfig, output: str) -> list[str]:
    """The job's sbatch options, in a fixed order (golden tests compare them)."""
    opts = [f"--job-name={c.job_name}", f"--nodes={c.nodes}", f"--ntasks-per-node={c.tasks_per_node}",
            f"--cpus-per-task={c.cpus_per_task}", *_optional_options(c), f"--time={c.time}"]
    if c.signal_grace_s > 0:
        opts.append(f"--signal=USR1@{c.signal_grace_s}")
    opts += ["--requeue" if c.requeue_max > 0 else "--no-requeue", "--open-mode=append",
             f"--output={output}"]
    return opts + list(c.sbatch_extra)


def _optional_options(c: ClusterConfig) -> list[str]:
    pairs = (("gpus-per-node", c.gpus_per_node or None), ("mem", c.mem), ("partition", c.partition),
             ("account", c.account), ("qos", c.qos))
    opts = [f"--{key}={value}" for key, value in pairs if value is not None]
    return opts + (["--exclusive"] if c.exclusive else [])


def directives(options: list[str]) -> str:
    return "\n".join(f"#SBATCH {opt}" for opt in options)


def container_args(c: ClusterConfig, mount_run_dir: bool) -> str:
    """pyxis/enroot flags for srun, or nothing. The submit dir (mptk's checkout: ``python -m``
    finds it there) is mounted and is the work dir; an absolute run dir is mounted too."""
    if not c.container_image:
        return ""
    own = ['"$PWD:$PWD"', *(['"$RUN_DIR:$RUN_DIR"'] if mount_run_dir else [])]
    mounts = ",".join([*own, *(shlex.quote(m) for m in c.container_mounts)])
    return (f" \\\n    --container-image={shlex.quote(c.container_image)}"
            f" --container-mounts={mounts} --container-workdir=\"$PWD\"")


def bash_array(words: tuple[str, ...]) -> str:
    """The inside of ``NAME=( ... )``: one quoted word per line (nothing when empty)."""
    if not words:
        return ""
    return "".join(f"\n    {shlex.quote(w)}" for w in words) + "\n"


def setup_block(lines: list[str]) -> str:
    if not lines:
        return ""
    return "\n# cluster.setup\n" + "\n".join(lines) + "\n"


def environment_block(spec: JobSpec) -> str:
    if spec.job_env:
        return JOB_ENV.rstrip("\n")
    c = spec.cluster
    note = " and cluster.debug_env (cluster.debug=true)" if c.debug else ""
    body = exports(fabric_env(c)) or "# (none)"
    return STATIC_ENV.substitute(debug_note=f" of profile fabric={c.fabric.value}{note}", exports=body)


def flight_recorder_block() -> str:
    """``export NAME="${NAME:-value}"`` for each flight recorder variable, dumps into the run dir."""
    lines = [f'export {k}="${{{k}:-{v}}}"' for k, v in flight_recorder_env("$RUN_DIR").items()]
    return FLIGHT_RECORDER.substitute(exports="\n".join(lines))


def nsys_block(c: ClusterConfig) -> str:
    """The opt-in nsys wrapper; nsys is looked up on the host unless a container runs the tasks."""
    return NSYS.substitute(check="" if c.container_image else NSYS_CHECK)


# --------------------------------------------------------------------------- rendering


def render(spec: JobSpec) -> str:
    """The sbatch script for ``spec``."""
    c = spec.cluster
    return JOB_SCRIPT.substitute(
        title=spec.title, usage=spec.usage, fabric=c.fabric.value, nodes=c.nodes,
        tasks_per_node=c.tasks_per_node, directives=directives(sbatch_options(c, spec.output)),
        requeue_code=REQUEUE_EXIT_CODE, requeue_max=c.requeue_max, python=spec.python,
        run_dir=spec.run_dir, overrides=bash_array(spec.overrides),
        setup=setup_block(c.setup), environment=environment_block(spec), exit_wait=c.exit_wait_s,
        flight_recorder=flight_recorder_block(), nsys=nsys_block(c),
        container=container_args(c, not spec.job_env),
    )


def job_spec(cluster: ClusterConfig, overrides: list[str], run_dir: str, python: str) -> JobSpec:
    """The spec ``mptk-submit`` renders: everything baked in, ``run_dir`` absolute."""
    return JobSpec(
        cluster=cluster, overrides=tuple(overrides), run_dir=shlex.quote(run_dir),
        output=f"{run_dir}/slurm-%j.out",
        python=IN_CONTAINER_PYTHON if cluster.container_image else python,
        title=f"mptk run in {run_dir}",
        usage="Submit: sbatch <this file> [more hydra overrides]  (mptk-submit did it already)",
        job_env=False,
    )


def example_spec(example: Example) -> JobSpec:
    """The spec of a checked-in example: the allocation of the cluster profile its overrides
    compose (the primary config's ``local_cpu`` unless they change it)."""
    from mptk.config.load import compose

    cluster = compose(list(example.overrides)).cluster
    return JobSpec(
        cluster=dataclasses.replace(cluster, job_name=f"mptk-{example.name}"),
        overrides=example.overrides,
        run_dir='"${MPTK_RUN_DIR:-outputs/slurm/$SLURM_JOB_NAME-$SLURM_JOB_ID}"',
        output="%x-%j.out", python=IN_CONTAINER_PYTHON,
        title=f"Example: {example.description}.",
        usage=(f"Usage: sbatch [sbatch options] slurm/{example.name}.sbatch [hydra overrides]\n"
               "# from the repo root with mptk's venv active (or MPTK_PYTHON=/path/to/python); e.g.\n"
               f"#   sbatch slurm/{example.name}.sbatch train.steps=50\n"
               "#   sbatch --nodes=2 slurm/{name}.sbatch cluster.nodes=2   (keep both in step: preflight\n"
               "#   checks world == cluster.nodes * cluster.tasks_per_node; mptk-submit renders both)"
               ).replace("{name}", example.name),
        job_env=True,
    )


def write_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """(Re)write ``slurm/<name>.sbatch`` for every example; returns the paths."""
    paths = []
    for example in EXAMPLES:
        path = folder / f"{example.name}.sbatch"
        path.write_text(render(example_spec(example)))
        path.chmod(0o755)
        paths.append(path)
    return paths


def main() -> None:
    """``python -m mptk.launch.slurm``: regenerate the checked-in examples."""
    for path in write_examples():
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
