"""GFLOPs per image counted on the real architectures (meta device, no weights)."""

from __future__ import annotations

import pytest
import torch

from difftune.trainables.cost import gflops_to, model_costs, module_gflops
from difftune.trainables.features import Extractor


def test_paper256_costs_follow_its_block_table():
    costs = model_costs("paper256")
    assert sorted(costs) == list(range(1, 38))
    assert (costs[24].channels, costs[24].side) == (1024, 16)
    assert (costs[19].channels, costs[19].side) == (1024, 8)
    # block 1 is a 3 -> 256 3x3 conv at 256 x 256: 2 * 3 * 9 * 256 * 256^2 FLOPs
    assert costs[1].gflops == pytest.approx(2 * 3 * 9 * 256 * 256**2 / 1e9, rel=1e-6)
    cum = [costs[b].gflops_to for b in range(1, 38)]
    assert cum == sorted(cum) and cum[-1] == pytest.approx(sum(c.gflops for c in costs.values())
                                                           + cum[0] - costs[1].gflops)
    # early exit at the middle block costs about a quarter of a full pass
    assert 0.2 < costs[19].gflops_to / costs[37].gflops_to < 0.35
    assert gflops_to(costs, [19, 24, 30]) == costs[30].gflops_to


def test_demo_costs_match_a_flop_count_of_the_real_extraction(demo_unet):
    """The meta-device count equals a count of a real early-exit extraction on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    costs = model_costs("demo")
    ex = Extractor(*demo_unet)
    with FlopCounterMode(display=False) as counter:
        ex.extract(torch.zeros(1, 3, 16, 16), 50, [10])
    # the extraction also pools the map and draws noise: a few FLOPs more, never fewer
    assert counter.get_total_flops() / 1e9 == pytest.approx(costs[10].gflops_to, rel=0.01)


def test_module_gflops_of_a_linear_layer():
    layer = torch.nn.Linear(100, 10)
    assert module_gflops(layer, torch.zeros(4, 100)) == pytest.approx(2 * 4 * 100 * 10 / 1e9)


def test_trial_gflops_counts_the_passes_and_the_head():
    """What a trial reports as ``gflops``: one early-exit pass per timestep + the head."""
    from difftune.trainables.config import TrialConfig
    from difftune.trainables.cost import trial_gflops

    costs = model_costs("demo")
    linear = TrialConfig(head="linear", block=10, t=90, pool=2)
    shapes = {(90, 10): (costs[10].channels, 2, 2)}
    head = 2 * costs[10].channels * 4 * 10 / 1e9  # one [C*4 -> 10] matmul
    assert trial_gflops(linear, shapes, 10) == pytest.approx(costs[10].gflops_to + head, rel=1e-3)
    # a DifFormer on blocks {7, 13} at 3 timesteps: 3 passes, each stopped after block 13
    dif = TrialConfig(head="difformer", blocks=[7, 13], timesteps=[10, 50, 90], pre_pool=2,
                      dim=16, heads=2, depth=1)
    dshapes = {(t, b): (costs[b].channels, 2, 2) for t in (10, 50, 90) for b in (7, 13)}
    assert trial_gflops(dif, dshapes, 10) > 3 * costs[13].gflops_to
    assert trial_gflops(dif, dshapes, 10) < 3 * costs[13].gflops_to + 0.01
    # DifFeed runs its own two passes (to its deepest feedback block, then to its block)
    feed = TrialConfig(head="diffeed", block=10, t=90, feedback_blocks=[11, 13], pre_pool=4,
                       dim=16, heads=2, depth=1)
    both = costs[13].gflops_to + costs[10].gflops_to
    assert both < trial_gflops(feed, {}, 10) < both * 1.2
    # counted on the meta device: the global random state is as it was
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    trial_gflops(feed, {}, 10)
    assert torch.equal(torch.rand(3), expected)
