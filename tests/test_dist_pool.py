"""The multi-process harness itself: results come back in rank order from one
process group, and a rank's error reaches the test with its traceback."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dist_pool import DistPool


def _all_reduce_rank(scale: float) -> tuple:
    t = torch.tensor([float(dist.get_rank() + 1) * scale])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), t.item()


def _fail_on_rank_1() -> int:
    if dist.get_rank() == 1:
        raise ValueError("rank 1 says no")
    return dist.get_rank()


@pytest.mark.parametrize("world", [2, 3])
def test_pool_runs_every_rank_in_one_group(world, request):
    pool = request.getfixturevalue(f"dist{world}")
    scale = float(torch.rand(()) + 0.5)
    results = pool.run(_all_reduce_rank, scale)
    total = scale * world * (world + 1) / 2
    assert [(r, w) for r, w, _ in results] == [(r, world) for r in range(world)]
    assert all(v == pytest.approx(total) for _, _, v in results)


def test_pool_reports_a_rank_error_and_shuts_down():
    pool = DistPool(2, timeout=30)
    try:
        with pytest.raises(RuntimeError, match=r"(?s)rank 1:.*ValueError: rank 1 says no"):
            pool.run(_fail_on_rank_1)
        with pytest.raises(RuntimeError, match="shut down"):
            pool.run(_fail_on_rank_1)
    finally:
        pool.close()
