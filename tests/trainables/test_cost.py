"""GFLOPs per image, activation bytes per image and entry bytes, counted on the real
architectures (meta device, no weights) and checked against measured runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from difftune.trainables.model.cost import (
    batch_for_memory,
    entry_bytes,
    gflops_to,
    model_costs,
    module_gflops,
)
from difftune.trainables.model.features import Extractor


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
    from difftune.trainables.trial import trial_gflops

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


# ------------------------------------------------------------------- memory and disk

MEASURE = r"""
import json, sys, torch
from difftune.trainables.model.features import Extractor
from difftune.trainables.model.unet import load_unet

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
model, diffusion = load_unet("paper256", random_init=True)
ex = Extractor(model, diffusion)
x = torch.rand(2, 3, 256, 256) * 2 - 1
ex.extract(x[:1], 90, {3: 2})  # the CPU kernels' one-time set-up is not the pass's memory
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident set size (VmHWM) to the current one
before = status("VmRSS:")
ex.extract(x, 90, {24: 2}, indices=[0, 1])
print(json.dumps({"peak": status("VmHWM:") - before}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_activation_estimate_matches_the_measured_peak_of_an_extraction():
    """Block 24 of paper256 (random weights, 256 px, 2 images on the CPU): the process's peak
    resident memory during the pass, above what the weights hold, is the plan's estimate."""
    from difftune.trainables.model.cost import activation_bytes_per_image
    from difftune.trainables.model.unet import PAPER256_FLAGS

    per_image, fixed = activation_bytes_per_image(PAPER256_FLAGS, 24)
    estimate = fixed + 2 * per_image
    out = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
    assert measured == pytest.approx(estimate, rel=0.25), (measured, estimate)
    # the skip connections of blocks 1..13 are not kept to block 24: a full pass costs more
    assert activation_bytes_per_image(PAPER256_FLAGS, 37)[0] > 1.3 * per_image


def test_activation_bytes_scale_with_the_batch_and_shrink_in_bf16():
    from difftune.trainables.model.cost import activation_bytes, activation_bytes_per_image
    from difftune.trainables.model.unet import PAPER256_FLAGS

    one = activation_bytes(PAPER256_FLAGS, 19, batch=1)
    four = activation_bytes(PAPER256_FLAGS, 19, batch=4)
    per_image, fixed = activation_bytes_per_image(PAPER256_FLAGS, 19)
    assert four == pytest.approx(fixed + 4 * per_image, rel=0.01) and four > 3.5 * one
    # block 1's output alone is 256 x 256 x 256 float32 values: a lower bound
    assert per_image > 256 * 256 * 256 * 4
    bf16 = activation_bytes_per_image(PAPER256_FLAGS, 19, precision="bf16")[0]
    assert 0.4 * per_image < bf16 < 0.9 * per_image  # GroupNorm still runs in float32


def test_batch_for_memory_follows_from_free_memory():
    gib = 2**30
    # 24 GiB free, 300 MiB per image, 1 GiB fixed: (0.7 * 24 GiB - 1 GiB) / 300 MiB = 53
    assert batch_for_memory(24 * gib, 300 * 2**20, gib) == 53
    assert batch_for_memory(24 * gib, 300 * 2**20, gib, headroom=0.5) == 37
    assert batch_for_memory(gib, 10 * gib) == 1  # never below one image
    assert batch_for_memory(80 * gib, 2**20) == 256  # never above the cap
    assert batch_for_memory(80 * gib, 2**20, cap=1024) == 1024


def test_entry_bytes_are_the_features_plus_index_and_label():
    # block 24, pool 2, float16, ImageNet-1k train: 1024 x 2 x 2 x 2 bytes + 16 per image
    assert entry_bytes(1_281_167, 1024, 2) == 1_281_167 * (1024 * 2 * 2 * 2 + 16)
    assert entry_bytes(1_281_167, 1024, 2) / 1e9 == pytest.approx(10.5, abs=0.05)
    assert entry_bytes(10, 256, 8, "float32") == 10 * (256 * 64 * 4 + 16)
