"""Model loading (trainables.unet): the paper's 256x256 model at the paper's block table, the
shipped demo model (a real diffusion model), users' checkpoints, and loading errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml

import difftune.trainables as trainables
from difftune.trainables.errors import UserError
from difftune.trainables.model.features import Extractor, block_modules
from difftune.trainables.model.geometry import geometry_of_model
from difftune.trainables.model.unet import (
    DEMO_CHECKPOINT,
    PAPER_CHECKPOINT_URL,
    ModelError,
    build,
    load_unet,
)
from difftune.trainables.train.probe import probe_grid

# --------------------------------------------------------------------------------------
# paper256: the paper's block table (random init, one 256 px image, one full extraction)
# --------------------------------------------------------------------------------------

#: (first block, last block) -> channels / spatial side at 256 px input
CHANNELS = {(1, 7): 256, (8, 13): 512, (14, 25): 1024, (26, 31): 512, (32, 37): 256}
SPATIAL = {(1, 3): 256, (4, 6): 128, (7, 9): 64, (10, 12): 32, (13, 15): 16, (16, 21): 8,
           (22, 24): 16, (25, 27): 32, (28, 30): 64, (31, 33): 128, (34, 37): 256}


def expand(table: dict[tuple[int, int], int]) -> dict[int, int]:
    return {b: v for (lo, hi), v in table.items() for b in range(lo, hi + 1)}


def test_paper256_block_table(paper256):
    model, diffusion = paper256
    assert geometry_of_model(model).num_blocks == 37
    mods = block_modules(model)
    assert mods[18] is model.middle_block  # block 19
    assert mods[23] is model.output_blocks[4]  # block 24
    assert mods[29] is model.output_blocks[10]  # block 30
    assert diffusion.num_timesteps == 1000

    x0 = torch.zeros(1, 3, 256, 256)
    feats = Extractor(model, diffusion).extract(x0, 90, list(range(1, 38)))
    channels, spatial = expand(CHANNELS), expand(SPATIAL)
    assert sorted(feats) == list(range(1, 38)) == sorted(channels) == sorted(spatial)
    got = {b: tuple(f.shape) for b, f in feats.items()}
    want = {b: (1, channels[b], spatial[b], spatial[b]) for b in range(1, 38)}
    assert got == want
    assert got[19] == (1, 1024, 8, 8)
    assert got[24] == (1, 1024, 16, 16)
    assert got[30] == (1, 512, 64, 64)


def test_paper256_flags_are_the_papers(paper256):
    model, diffusion = paper256
    assert model.image_size == 256
    assert model.model_channels == 256
    assert model.num_res_blocks == 2
    assert model.num_classes is None  # unconditional
    assert model.out_channels == 6  # learn_sigma
    assert model.dtype == torch.float32  # fp16 only on GPU
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    # attention at 32, 16, 8 px (downsample rates 8, 16, 32), 64 channels per head
    from guided_diffusion.unet import AttentionBlock

    attn = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert attn and all(m.num_heads == m.channels // 64 for m in attn)


def test_paper256_without_checkpoint_says_where_to_get_it():
    with pytest.raises(ModelError) as info:
        load_unet("paper256")
    msg = str(info.value)
    assert "256x256_diffusion_uncond.pt" in msg and PAPER_CHECKPOINT_URL in msg
    assert "--checkpoint" in msg
    assert isinstance(info.value, UserError)


# --------------------------------------------------------------------------------------
# the demo model
# --------------------------------------------------------------------------------------


def test_demo_loads_from_any_working_directory(monkeypatch, tmp_path, demo_unet):
    monkeypatch.chdir(tmp_path)
    model, diffusion = load_unet("demo")
    assert DEMO_CHECKPOINT.is_file() and DEMO_CHECKPOINT.with_suffix(".yaml").is_file()
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    state = torch.load(DEMO_CHECKPOINT, map_location="cpu", weights_only=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert os.listdir(tmp_path) == []  # loading writes nothing into the working directory


def test_demo_random_init_is_the_same_architecture(demo_unet, demo_unet_untrained):
    trained, untrained = demo_unet[0].state_dict(), demo_unet_untrained[0].state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in untrained.items()}
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained)


#: the probe of test_demo_is_a_real_diffusion_model: middle block, small t, global average
#: pooling (at pool 2 even random features of digits probe to ~90%: ResBlocks and attention
#: start as identities in guided-diffusion, so an untrained U-Net passes the image through)
PROBE_T, PROBE_POOL, PROBE_EPOCHS = 30, 1, 10


def probe_top1(unet, *, block: int, t: int, pool: int, epochs: int) -> float:
    """Val top-1 of ``difftune probe``'s linear probe on ``block`` at step ``t``."""
    grid = probe_grid(unet, data="digits", blocks=[block], timesteps=[t], pools=[pool],
                      epochs=epochs)
    return grid[(block, t, pool)]["val_top1"]


def test_demo_is_a_real_diffusion_model(demo_unet, demo_unet_untrained):
    """The issue's bar: a linear probe on the demo model's middle block at small t beats the
    same architecture untrained by at least 20 points on digits val."""
    settings = dict(block=10, t=PROBE_T, pool=PROBE_POOL, epochs=PROBE_EPOCHS)
    assert geometry_of_model(demo_unet[0]).num_blocks == 19  # block 10 is the middle block
    trained = probe_top1(demo_unet, **settings)
    untrained = probe_top1(demo_unet_untrained, **settings)
    print(f"demo probe top-1: trained {trained:.1f}%, untrained {untrained:.1f}%")
    assert trained >= untrained + 20, (trained, untrained)

# --------------------------------------------------------------------------------------
# users' checkpoints
# --------------------------------------------------------------------------------------


def save_model(model, flags: dict, path) -> None:
    torch.save(model.state_dict(), path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(flags))


def test_user_checkpoint_with_flags_beside_it(tmp_path, tiny_flags):
    torch.manual_seed(1)
    model, _ = build(tiny_flags)
    save_model(model, tiny_flags, tmp_path / "mine.pt")
    loaded, diffusion = load_unet(str(tmp_path / "mine.pt"))
    assert geometry_of_model(loaded) == geometry_of_model(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())


def test_user_checkpoint_flags_given_explicitly(tmp_path, tiny_flags):
    model, _ = build(tiny_flags)
    # a training checkpoint wrapping the weights in {"state_dict": ...}, flags as JSON elsewhere
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.bin")
    (tmp_path / "flags.json").write_text(json.dumps(tiny_flags))
    a, _ = load_unet(str(tmp_path / "ckpt.bin"), flags=tmp_path / "flags.json")
    b, _ = load_unet(str(tmp_path / "ckpt.bin"), flags=dict(tiny_flags))
    for k, v in model.state_dict().items():
        assert torch.equal(v, a.state_dict()[k]) and torch.equal(v, b.state_dict()[k]), k


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_unet("paper256", checkpoint=tmp_path / "nope.pt")
    with pytest.raises(ModelError, match="nope.pt"):
        load_unet(str(tmp_path / "nope.pt"))


def test_checkpoint_without_flags(tmp_path, tiny_flags):
    model, _ = build(tiny_flags)
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(ModelError, match=r"bare\.yaml"):
        load_unet(str(tmp_path / "bare.pt"))


@pytest.mark.parametrize(
    "other, expect",
    [
        (dict(num_channels=64), ["shape mismatch", "vs model"]),
        (dict(num_res_blocks=2), ["unexpected keys"]),
        (dict(channel_mult="1"), ["missing keys"]),
    ],
)
def test_checkpoint_for_another_architecture(tmp_path, tiny_flags, other, expect):
    other_model, _ = build(tiny_flags | other)
    save_model(other_model, tiny_flags, tmp_path / "other.pt")  # flags that do not fit
    with pytest.raises(ModelError) as info:
        load_unet(str(tmp_path / "other.pt"))
    msg = str(info.value)
    assert "\n" not in msg and "Traceback" not in msg
    for word in expect:
        assert word in msg, msg
    assert "does not fit the model flags" in msg


class Pickled:
    """Not a tensor: a checkpoint holding it needs pickle."""

    def __init__(self):
        self.x = 1


def some_function():
    return 1


@pytest.mark.parametrize("payload", [Pickled(), some_function])
def test_checkpoint_needing_pickle_is_refused(tmp_path, tiny_flags, payload):
    model, _ = build(tiny_flags)
    state = dict(model.state_dict())
    state["evil"] = payload
    torch.save(state, tmp_path / "pickled.pt")
    (tmp_path / "pickled.yaml").write_text(yaml.safe_dump(tiny_flags))
    with pytest.raises(ModelError, match="weights_only"):
        load_unet(str(tmp_path / "pickled.pt"))


def test_not_a_torch_file(tmp_path, tiny_flags):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.yaml").write_text(yaml.safe_dump(tiny_flags))
    with pytest.raises(ModelError, match="junk.pt"):
        load_unet(str(tmp_path / "junk.pt"))


def test_unknown_model_flags(tmp_path, tiny_flags):
    model, _ = build(tiny_flags)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(tiny_flags | {"num_chanels": 32}))
    with pytest.raises(ModelError, match="num_chanels"):
        load_unet(str(tmp_path / "m.pt"))
    with pytest.raises(ModelError, match="unknown model flag"):
        build({"bogus_flag": 1})


def test_bad_flag_values_and_files(tmp_path, tiny_flags):
    with pytest.raises(ModelError, match="cannot build"):
        build(tiny_flags | {"num_channels": 33})  # GroupNorm needs a multiple of 32
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    model, _ = build(tiny_flags)
    torch.save(model.state_dict(), tmp_path / "list.pt")
    with pytest.raises(ModelError, match="mapping"):
        load_unet(str(tmp_path / "list.pt"))


def test_unknown_model_name():
    with pytest.raises(ModelError, match="paper256, demo"):
        load_unet("paper512")


def test_demo_checkpoint_ships_in_the_wheel(tmp_path):
    """``load_unet("demo")`` must work after a non-editable install: the wheel built from the
    project's own files carries the checkpoint and its flags beside the package."""
    root = Path(__file__).resolve().parents[2]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "__init__.py"):
        if (root / name).is_file():
            shutil.copy(root / name, src / name)
    for pkg in ("trainables", "search", "spaces"):
        shutil.copytree(root / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-q", "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True, timeout=120,
    )
    (wheel,) = (tmp_path / "dist").glob("difftune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "difftune/trainables/assets/demo_unet.pt" in names
    assert "difftune/trainables/assets/demo_unet.yaml" in names
    assert "difftune/spaces/demo.yaml" in names
    # the distribution owns one import name: no top-level search/, trainables/, spaces/
    assert {n.split("/")[0] for n in names if not n.startswith("difftune-")} == {"difftune"}
    top = zipfile.ZipFile(wheel).read("difftune-0.1.0.dist-info/top_level.txt").decode()
    assert top.split() == ["difftune"]
    assert DEMO_CHECKPOINT.parent.name == "assets"
    assert DEMO_CHECKPOINT.parent.parent == Path(trainables.__file__).resolve().parent
