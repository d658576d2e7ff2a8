"""Context parallelism's pure parts: the preflight lines for impossible combinations (naming
every factor), the load-balanced sequence split, and the planner's view (activations divided
by cp, an all-to-all term, cp ranked by the search)."""

import pytest

from mptk.config.checks import config_problems
from mptk.config.load import compose
from mptk.parallel.layout import cp_positions, derive


def problems(*overrides, world=4):
    cfg = compose(["model=gpt_tiny", f"launcher.nproc_per_node={world}", *overrides])
    return config_problems(cfg, world, False)


@pytest.mark.parametrize("overrides,line", [
    (("parallel.tp=2", "parallel.cp=4", "model.num_query_groups=2"),
     "parallel.cp: heads(4)/tp(2) % cp(4) != 0"),
    (("parallel.tp=1", "parallel.cp=4", "model.seq_length=100"),
     "model.seq_length(100) % 2*cp(4) != 0"),
    (("parallel.tp=2", "parallel.cp=2", "parallel.sp=true", "model.seq_length=36"),
     "model.seq_length(36) % 2*cp(2)*tp(2) (sp) != 0"),
    (("parallel.tp=2", "parallel.cp=2"), "parallel: tp(2)*cp(2)*pp(1)=4 exceeds world(3)"),
    (("parallel.tp=1", "parallel.cp=2", "model.attention=local"),
     "parallel.cp(2) needs model.attention=sdpa"),
    (("parallel.tp=1", "parallel.cp=0"), "parallel.cp(0) must be >= 1"),
])
def test_impossible_context_parallel_layouts_get_one_line(overrides, line):
    world = 3 if "exceeds" in line else 8
    found = problems(*overrides, world=world)
    assert any(p.startswith(line) for p in found), found


def test_context_parallel_layout_is_accepted_and_derived():
    assert problems("parallel.tp=1", "parallel.cp=4", "model.seq_length=8192") == []
    cfg = compose(["model=gpt_tiny", "parallel.tp=2", "parallel.cp=2", "parallel.pp=1",
                   "launcher.nproc_per_node=8", "train.global_batch_size=16",
                   "train.micro_batch_size=2"])
    layout = derive(cfg, 8)
    assert (layout.tp, layout.cp, layout.dp, layout.grad_acc) == (2, 2, 2, 4)


def test_cp_ranks_hold_load_balanced_chunks_covering_the_sequence():
    assert cp_positions(8, 2, 0) == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1) == [2, 3, 4, 5]
    assert sorted(p for r in range(4) for p in cp_positions(64, 4, r)) == list(range(64))


def test_planner_divides_activations_by_cp_and_charges_the_all_to_all():
    from mptk.plan import RESERVE, choice_of, stage_counts
    from mptk.plan.cost import shape_of
    from mptk.plan.hardware import Cluster, gpu
    from mptk.plan.memory import rank_memory, training_of
    from mptk.plan.perf import estimate

    def plan(cp):
        cfg = compose(["model=gpt_tiny", "model.seq_length=8192", "parallel.tp=1",
                       f"parallel.cp={cp}", f"launcher.nproc_per_node={cp}",
                       "train.micro_batch_size=1", "train.global_batch_size=1"])
        c, sh, tr = choice_of(cfg, cp), shape_of(cfg.model), training_of(cfg)
        counts = stage_counts(cfg, c)
        return (rank_memory(sh, c, tr, counts, 0, RESERVE),
                estimate(sh, c, tr, Cluster(nodes=1, gpus_per_node=cp, gpu=gpu("h100")), counts, 0.5))

    (m1, t1), (m4, t4) = plan(1), plan(4)
    assert m4.activations == pytest.approx(m1.activations / 4)
    assert t1.cp == 0 and t4.cp > 0
    assert ("context-parallel all-to-all", t4.cp) in t4.rows()


def test_search_ranks_context_parallel_layouts():
    from mptk.plan.hardware import Cluster, gpu
    from mptk.plan.search import search

    cfg = compose(["model=gpt_tiny", "model.seq_length=8192", "train.micro_batch_size=1",
                   "train.global_batch_size=8"])
    result = search(cfg, Cluster(nodes=1, gpus_per_node=8, gpu=gpu("h100")))
    assert {p.choice.cp for p in result.ranked} >= {1, 2, 4}
