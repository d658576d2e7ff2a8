"""Phase min/max and the straggler over real gloo ranks: one rank computes slowly,
another waits long; the straggler is the slow one, not the waiting one."""

import time

import pytest
from harness import run_world

pytestmark = pytest.mark.spawn

SLOW, WAITER = 2, 0


def phases_of_rank(env):
    import torch.distributed as dist

    from mptk.log.phases import Phases, across_ranks

    dist.init_process_group("gloo", init_method=f"tcp://{env.master_addr}:{env.master_port}",
                            rank=env.rank, world_size=env.world_size)
    phases = Phases()
    for _ in range(2):
        with phases.span("forward"):
            time.sleep(0.25 if env.rank == SLOW else 0.02)
        with phases.span("p2p_wait"):
            time.sleep(0.4 if env.rank == WAITER else 0.0)
        phases.step_done()
    return across_ranks(phases.window())


def test_straggler_is_the_slow_rank_everywhere(tmp_path):
    results = run_world(phases_of_rank, 3, tmp=tmp_path)
    assert all(r == results[0] for r in results)  # every rank gets the same summary
    out = results[0]
    assert out["straggler_rank"] == SLOW
    assert out["forward_s_max"] == pytest.approx(0.25, abs=0.1)
    assert out["forward_s_min"] == pytest.approx(0.02, abs=0.05)
    assert out["p2p_wait_s_max"] == pytest.approx(0.4, abs=0.15)
