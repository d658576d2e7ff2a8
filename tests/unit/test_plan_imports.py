"""The planning path (mptk-plan: compose, recipes' configs, cost model, search, report, and the
training preflight behind --why) imports neither torch nor megatron-core: start-up stays well
under the planner's 2 s per call."""

import subprocess
import sys

CODE = """
import sys
from mptk.cli import plan
from mptk.config.load import compose
from mptk.plan import search as s
from mptk.plan.hardware import Cluster, gpu
cfg = compose(["model=gpt_1p3b", "train.dtype=bf16"])
compose(["experiment=vit_digits"])
result = s.search(cfg, Cluster(nodes=2, gpus_per_node=8, gpu=gpu("h100")))
assert result.ranked, "the search found no layout"
from mptk.cli import plan_report
why = plan_report.why(cfg, result, 16)  # --why: the training preflight's lines per reason
assert any(lines for *_, lines in why), why
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "megatron", "deepspeed"})
print("HEAVY", heavy)
"""


def test_planning_imports_no_torch_or_megatron():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]
