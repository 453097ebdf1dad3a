"""Loading a checkpoint holds the weights once (:func:`~difftune.trainables.model.unet.load_state`):
the model is built on the meta device, the file is memory-mapped and its tensors become the
parameters, so no second copy of the weights is ever made."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from difftune.trainables.model.unet import build, load_unet


def _save(model: torch.nn.Module, flags: dict, path: Path, dtype=None) -> dict:
    state = {k: (v.to(dtype) if dtype is not None else v).clone()
             for k, v in model.state_dict().items()}
    torch.save(state, path)
    path.with_suffix(".yaml").write_text(yaml.safe_dump(flags))
    return state


def _mapped_files() -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of every file mapping of this process."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            lo, hi = (int(a, 16) for a in parts[0].split("-"))
            out.append((lo, hi, parts[5]))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="needs Linux /proc")
def test_loaded_weights_are_the_mapped_file(tmp_path, tiny_flags):
    torch.manual_seed(0)
    model, _ = build(tiny_flags)
    state = _save(model, tiny_flags, tmp_path / "w.pt")
    loaded, _ = load_unet(str(tmp_path / "w.pt"))
    maps = [(lo, hi) for lo, hi, p in _mapped_files() if p == str(tmp_path / "w.pt")]
    assert maps, "the checkpoint is not memory-mapped"
    for name, p in loaded.named_parameters():
        ptr = p.data_ptr()
        assert any(lo <= ptr < hi for lo, hi in maps), f"{name} was copied out of the file"
        assert torch.equal(p, state[name]) and not p.requires_grad
    assert not loaded.training


def test_a_half_precision_checkpoint_loads_as_the_models_dtype(tmp_path, tiny_flags):
    torch.manual_seed(1)
    model, _ = build(tiny_flags)
    state = _save(model, tiny_flags, tmp_path / "half.pt", dtype=torch.float16)
    loaded, _ = load_unet(str(tmp_path / "half.pt"))
    for name, p in loaded.named_parameters():
        assert p.dtype == torch.float32, name
        assert torch.equal(p, state[name].float()), name
    x = torch.rand(2, 3, tiny_flags["image_size"], tiny_flags["image_size"])
    out = loaded(x, torch.tensor([10, 500]))
    assert torch.isfinite(out).all()
