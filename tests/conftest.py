"""Shared fixtures for the whole suite. Keep this file small; one section per concern.

Heavy objects (U-Nets) are session-scoped and must be treated as read-only by tests.
"""

from __future__ import annotations

import os

import pytest

# --------------------------------------------------------------------------------------
# The process's MLflow store
# --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _tracking_uri_env_kept():
    """``mlflow.set_tracking_uri`` also sets ``$MLFLOW_TRACKING_URI``, which difftune reads
    as the store to use: a test that calls it must not point the tests after it (and their
    "no store here" cases) at its temporary store."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


# --------------------------------------------------------------------------------------
# Models (trainables.unet)
# --------------------------------------------------------------------------------------

#: Flags of a tiny random U-Net (16 px, 2 levels) for tests that need a model built from
#: flags of their own rather than the shipped demo checkpoint.
TINY_FLAGS = dict(
    image_size=16,
    num_channels=32,
    channel_mult="1,2",
    num_res_blocks=1,
    attention_resolutions="8",
    num_head_channels=32,
    learn_sigma=False,
    class_cond=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    use_scale_shift_norm=True,
    resblock_updown=False,
)


@pytest.fixture
def tiny_flags() -> dict:
    """A fresh copy of :data:`TINY_FLAGS` (guided-diffusion flags of a tiny U-Net)."""
    return dict(TINY_FLAGS)


@pytest.fixture(scope="session")
def demo_unet():
    """``(model, diffusion)`` of the shipped demo U-Net (``load_unet("demo")``)."""
    from difftune.trainables.model.unet import load_unet

    return load_unet("demo")


@pytest.fixture(scope="session")
def demo_unet_untrained():
    """The demo architecture with random weights (``load_unet("demo", random_init=True)``)."""
    import torch

    from difftune.trainables.model.unet import load_unet

    torch.manual_seed(0)
    return load_unet("demo", random_init=True)


@pytest.fixture(scope="session")
def paper256():
    """The paper's 256x256 unconditional ImageNet U-Net with random weights. Building it on
    CPU costs several seconds and ~2.2 GB, so it is built once per session."""
    import torch

    from difftune.trainables.model.unet import load_unet

    torch.manual_seed(0)
    return load_unet("paper256", random_init=True)
