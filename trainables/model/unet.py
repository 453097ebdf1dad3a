"""Loading guided-diffusion U-Nets: the paper's 256x256 model, the shipped demo model, or a
user's own checkpoint with its flags.

Flags are guided-diffusion's ``model_and_diffusion_defaults`` keys; they travel with a
checkpoint by name (a YAML/JSON file beside it) so that a model is always rebuilt exactly.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from difftune.trainables.errors import UserError
from difftune.trainables.model.geometry import Geometry, geometry_of_flags

with warnings.catch_warnings():
    # guided-diffusion uses torch.cuda.amp.custom_fwd, deprecated in recent torch.
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion import script_util

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_CHECKPOINT = ASSETS / "demo_unet.pt"
PAPER_CHECKPOINT_NAME = "256x256_diffusion_uncond.pt"
PAPER_CHECKPOINT_URL = (
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"
)

#: The paper's model: OpenAI guided-diffusion, 256x256 unconditional ImageNet.
PAPER256_FLAGS: dict[str, Any] = dict(
    attention_resolutions="32,16,8",
    class_cond=False,
    diffusion_steps=1000,
    image_size=256,
    learn_sigma=True,
    noise_schedule="linear",
    num_channels=256,
    num_head_channels=64,
    num_res_blocks=2,
    resblock_updown=True,
    use_fp16=False,  # difftune runs the U-Net in fp32, under autocast on a GPU
    use_scale_shift_norm=True,
)


class ModelError(UserError):
    """A model a user asked for cannot be built or loaded (a user error, exit code 2)."""


def full_flags(flags: dict[str, Any]) -> dict[str, Any]:
    """Complete ``flags`` with guided-diffusion's defaults; unknown keys are an error.

    Lists (e.g. ``attention_resolutions: [32, 16, 8]``) are accepted and turned into the
    comma strings guided-diffusion wants.
    """
    defaults = script_util.model_and_diffusion_defaults()
    unknown = sorted(set(flags) - set(defaults))
    if unknown:
        raise ModelError(
            f"unknown model flag(s) {unknown}; allowed: {sorted(defaults)}"
        )
    out = dict(defaults)
    for key, value in flags.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        out[key] = value
    return out


def read_flags(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file of guided-diffusion flags."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model flags file {path} does not exist")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ModelError(f"model flags file {path} is not valid YAML/JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelError(f"model flags file {path} must be a mapping of flag: value")
    return data


def _flags_beside(checkpoint: Path) -> Path | None:
    for suffix in (".yaml", ".yml", ".json"):
        candidate = checkpoint.with_suffix(suffix)
        if candidate.is_file():
            return candidate
    return None


def build(flags: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """Build ``(model, diffusion)`` with random weights from (partial) flags."""
    flags = full_flags(flags)
    try:
        return script_util.create_model_and_diffusion(**flags)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"cannot build a U-Net from flags {flags}: {exc}") from None


def read_state(checkpoint: str | Path, *, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint's state_dict, read with ``weights_only=True`` (``mmap``: without reading
    the tensors into memory, for checks)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if mmap and "mmap" in str(exc):  # a legacy (non-zip) file cannot be memory-mapped
            return read_state(path)
        state = exc
    except Exception as exc:  # pickle refusal, truncated file, not a torch file
        state = exc
    if isinstance(state, Exception):
        text = str(state).strip()
        first = text.splitlines()[0] if text else type(state).__name__
        raise ModelError(
            f"checkpoint {path} cannot be loaded with weights_only=True (a plain state_dict of "
            f"tensors is required; pickled objects are refused): {first}"
        )
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"checkpoint {path} does not hold a state_dict")
    return state


def check_fit(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise :class:`ModelError` naming missing/unexpected keys and shape mismatches (one line)."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = sorted(
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in set(own) & set(state)
        if tuple(state[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or mismatched:

        def few(items: list[str]) -> str:
            return ", ".join(items[:5]) + (f" (+{len(items) - 5} more)" if len(items) > 5 else "")

        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {few(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches: {few(mismatched)}")
        raise ModelError(
            f"checkpoint {path} does not fit the model flags: " + "; ".join(parts)
            + " (pass the flags the checkpoint was trained with)"
        )


def load_state(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a checkpoint into ``model`` safely (``weights_only=True``), holding the weights
    once: the file is memory-mapped (``mmap=True``) and its tensors become the model's
    parameters (``load_state_dict(assign=True)``) instead of being copied into a second set
    (``model`` may be built on the meta device). A tensor stored in another dtype than the
    model's is converted (that one is copied).

    A checkpoint for another architecture raises :class:`ModelError` naming the missing,
    unexpected and mis-shaped keys in one message.
    """
    state = read_state(checkpoint, mmap=True)
    own = {k: v.dtype for k, v in model.state_dict().items()}
    check_fit(model.state_dict(), state, checkpoint)
    state = {k: v if v.dtype == own[k] else v.to(own[k]) for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a tensor the state does not hold (none in a guided-diffusion U-Net)
        raise ModelError(f"checkpoint {checkpoint} left {left[:5]} without values")


def check_model(name_or_path: str, *, checkpoint: str | Path | None = None) -> None:
    """Check, without loading weights into memory, that a model can be loaded: its flags
    build, its checkpoint exists, loads under ``weights_only`` and fits the architecture
    (compared on the meta device, so even paper256 costs no memory)."""
    flags, ckpt = resolve(name_or_path, checkpoint=checkpoint)
    if ckpt is None:
        load_unet(name_or_path, checkpoint=checkpoint)  # raises the "bring the checkpoint" error
    with torch.device("meta"):
        model, _ = build(flags)
    check_fit(model.state_dict(), read_state(ckpt, mmap=True), ckpt)


def resolve(
    name_or_path: str, *, checkpoint: str | Path | None = None, flags: str | Path | dict | None = None
) -> tuple[dict[str, Any], Path | None]:
    """Resolve a model name or path into ``(flags, checkpoint path or None)``."""
    if name_or_path == "paper256":
        return dict(PAPER256_FLAGS), Path(checkpoint) if checkpoint else None
    if name_or_path == "demo":
        ckpt = Path(checkpoint) if checkpoint else DEMO_CHECKPOINT
        return read_flags(DEMO_CHECKPOINT.with_suffix(".yaml")), ckpt
    ckpt = Path(checkpoint or name_or_path)
    if not ckpt.is_file():
        raise ModelError(
            f"model {name_or_path!r} is neither a preset (paper256, demo) nor an existing "
            "checkpoint file"
        )
    if isinstance(flags, dict):
        return flags, ckpt
    flags_path = Path(flags) if flags else _flags_beside(ckpt)
    if flags_path is None:
        raise ModelError(
            f"no model flags for checkpoint {ckpt}: put {ckpt.with_suffix('.yaml').name} "
            "(guided-diffusion model_and_diffusion_defaults keys) beside it"
        )
    return read_flags(flags_path), ckpt


def load_unet(
    name_or_path: str,
    *,
    checkpoint: str | Path | None = None,
    flags: str | Path | dict | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> tuple[torch.nn.Module, Any]:
    """Load a frozen guided-diffusion U-Net and its diffusion.

    :param name_or_path: ``paper256``, ``demo`` or the path of a checkpoint whose flags lie
        beside it (``model.pt`` + ``model.yaml``) or are given by ``flags``.
    :param checkpoint: weights for a preset (``paper256`` needs one unless ``random_init``).
    :param random_init: build the architecture with random weights (tests, benchmarks).
    :return: ``(model, diffusion)``; the model is in eval mode with gradients off.
    """
    model_flags, ckpt = resolve(name_or_path, checkpoint=checkpoint, flags=flags)
    if ckpt is None and not random_init:
        raise ModelError(
            f"model paper256 needs its checkpoint: download {PAPER_CHECKPOINT_NAME} from "
            f"{PAPER_CHECKPOINT_URL} and pass --checkpoint PATH (load_unet(..., checkpoint=PATH))"
        )
    if not random_init and not ckpt.is_file():  # before paying for building the model
        raise ModelError(f"checkpoint {ckpt} does not exist")
    device = torch.device(device)
    model_flags = dict(model_flags)
    model_flags["use_fp16"] = bool(model_flags.get("use_fp16")) and device.type == "cuda"
    if random_init:
        model, diffusion = build(model_flags)
    else:  # built without memory: the checkpoint's mapped tensors become its weights
        with torch.device("meta"):
            model, diffusion = build(model_flags)
        load_state(model, ckpt)
    if model_flags["use_fp16"]:
        model.convert_to_fp16()
    model.to(device).eval().requires_grad_(False)
    return model, diffusion


@functools.lru_cache(maxsize=2)
def shared_unet(model: str, checkpoint: str | None, device: str = "cpu") -> tuple[torch.nn.Module, Any]:
    """``load_unet`` memoised per process (a Ray worker runs many trials); read-only."""
    return load_unet(model, checkpoint=checkpoint, device=device)


def model_fingerprint(name_or_path: str, *, checkpoint: str | Path | None = None,
                      random_init: bool = False) -> str:
    """A content hash of a model: its flags and (unless random) its checkpoint bytes."""
    model_flags, ckpt = resolve(name_or_path, checkpoint=checkpoint)
    h = hashlib.sha256(json.dumps(full_flags(model_flags), sort_keys=True).encode())
    if random_init or ckpt is None:
        h.update(b"random-init")
    else:
        with open(ckpt, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def model_geometry(name_or_path: str, checkpoint: str | Path | None = None) -> Geometry:
    """Blocks and timesteps of a model, from its flags alone (no weights are read)."""
    flags, _ = resolve(name_or_path, checkpoint=checkpoint)
    return geometry_of_flags(full_flags(flags))
