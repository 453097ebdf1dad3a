"""Feature extraction from a frozen guided-diffusion U-Net at the paper's block numbering.

Blocks are numbered 1..N in forward order: ``input_blocks`` first, then ``middle_block``,
then ``output_blocks``. The forward pass is driven block by block here (guided-diffusion's
own ``forward`` always runs every block) so that it can stop after the deepest requested
block and so that DifFeed can add its feedback to chosen block outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

from difftune.trainables.errors import UserError

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    from guided_diffusion.nn import timestep_embedding


class ExtractionError(UserError):
    """A block, timestep or pooling size the model cannot serve (user error, exit code 2)."""


def block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's blocks in the paper's order: index ``b - 1`` is block ``b``."""
    return [*model.input_blocks, model.middle_block, *model.output_blocks]


def check_blocks(model: torch.nn.Module, blocks: Sequence[int]) -> list[int]:
    n = len(block_modules(model))
    if not blocks:
        raise ExtractionError(f"no blocks requested; allowed blocks for this model: 1..{n}")
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n:
            raise ExtractionError(f"block {b!r} is out of range; this model has blocks 1..{n}")
    return sorted(set(blocks))


def check_timestep(diffusion, t: int) -> int:
    steps = diffusion.num_timesteps
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < steps:
        raise ExtractionError(f"timestep t={t!r} is out of range; allowed: 0..{steps - 1}")
    return t


def check_pool(pool: int | None) -> int | None:
    if pool is not None and (isinstance(pool, bool) or not isinstance(pool, int) or pool <= 0):
        raise ExtractionError(f"pool={pool!r} is invalid; allowed: a positive int or None")
    return pool


def model_timesteps(diffusion, t: torch.Tensor) -> torch.Tensor:
    """The timestep argument the U-Net gets for diffusion step ``t`` (guided-diffusion's own
    mapping: respaced steps mapped to original ones, then rescaled if the model was trained
    with ``rescale_timesteps``)."""
    timestep_map = getattr(diffusion, "timestep_map", None)
    if timestep_map is not None:
        t = torch.as_tensor(timestep_map, device=t.device, dtype=t.dtype)[t]
        if diffusion.rescale_timesteps:
            t = t.float() * (1000.0 / diffusion.original_num_steps)
        return t
    return diffusion._scale_timesteps(t)


def noise_seed(seed: int, t: int, index: int) -> int:
    """A 63-bit generator seed for (noise seed, timestep, dataset index): the same on every
    machine and in every batch composition."""
    digest = hashlib.blake2b(f"{seed}:{t}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_noise(shape: Sequence[int], t: int, indices: Sequence[int], seed: int) -> torch.Tensor:
    """Noise ``[N x C x H x W]`` drawn per image from a generator seeded by (seed, t, index)."""
    out = torch.empty(len(indices), *shape[1:])
    g = torch.Generator()
    for row, idx in enumerate(indices):
        g.manual_seed(noise_seed(seed, t, int(idx)))
        out[row] = torch.randn(*shape[1:], generator=g)
    return out


#: the precisions a U-Net pass runs in, by name (the name is part of a cache entry's key)
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                      "fp16": torch.float16}


def precision_for(device: torch.device | str) -> str:
    """The precision extraction runs in on ``device``: ``bf16`` autocast on a GPU that has
    it, else ``fp16`` autocast on a GPU (a T4), ``fp32`` on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_for(device: torch.device, precision: str | None = None):
    """Autocast to ``precision`` (default :func:`precision_for` the device): bf16/fp16 on a
    GPU, nothing in fp32."""
    precision = precision or precision_for(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])


def run_blocks(
    model: torch.nn.Module,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    upto: int,
    on_block: Callable[[int, torch.Tensor], None] | None = None,
    inject: dict[int, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Run the U-Net's blocks 1..``upto`` and stop (guided-diffusion's forward, unrolled).

    :param x: an [N x C x H x W] Tensor, the noised input.
    :param timesteps: an [N] Tensor, the model's timestep argument.
    :param on_block: called with (block number, block output) after every block.
    :param inject: block number -> function of that block's output whose result replaces it
        before the next block sees it (DifFeed adds its feedback this way).
    :return: the output of block ``upto``.
    """
    emb = model.time_embed(timestep_embedding(timesteps, model.model_channels))
    h = x.type(model.dtype)
    del x
    # an encoder output is kept for its skip connection only when the decoder block that
    # reads it (its mirror, N + 1 - b) runs before the pass stops: nothing stays alive past
    # its last use (stopping at block 24 of 37 keeps encoder blocks 14..18, not 1..13)
    hs: list[torch.Tensor | None] = []
    b = 0
    n_in = len(model.input_blocks)
    n = n_in + 1 + len(model.output_blocks)

    def after(h: torch.Tensor) -> torch.Tensor:
        if inject and b in inject:
            h = inject[b](h)
        if on_block is not None:
            on_block(b, h)
        return h

    for module in model.input_blocks:
        b += 1
        h = after(module(h, emb))
        if b >= upto:
            return h
        hs.append(h if n + 1 - b <= upto else None)
    b += 1
    h = after(model.middle_block(h, emb))
    if b >= upto:
        return h
    for module in model.output_blocks:
        b += 1
        h = torch.cat([h, hs.pop()], dim=1)
        h = after(module(h, emb))
        if b >= upto:
            return h
    assert b == n
    return h


def pool_map(x: torch.Tensor, pool: int | None) -> torch.Tensor:
    """Adaptive average pooling of an [N x C x H x W] map to [N x C x pool x pool] (float32
    sums for a half-precision map, without a float32 copy of the whole map)."""
    if pool is None:
        return x
    n, c, h, w = x.shape
    if x.dtype in (torch.bfloat16, torch.float16) and h % pool == 0 and w % pool == 0:
        return x.reshape(n, c, pool, h // pool, pool, w // pool).mean(dim=(3, 5),
                                                                       dtype=torch.float32)
    return F.adaptive_avg_pool2d(x, pool)


class Extractor:
    """Read features of chosen blocks of a frozen U-Net at diffusion step ``t``.

    :param precision: ``fp32``, ``bf16`` or ``fp16`` (autocast); default: what
        :func:`precision_for` the model's device says (bf16 on a GPU that has it, fp32 on
        the CPU). The features always come back as float32.
    :param channels_last: run the convolutions on NHWC tensors (only on a GPU; the model is
        converted in place, once).
    """

    def __init__(self, model: torch.nn.Module, diffusion, *, precision: str | None = None,
                 channels_last: bool = False):
        self.model = model
        self.diffusion = diffusion
        if precision is not None and precision not in PRECISIONS:
            raise ExtractionError(f"precision={precision!r} is unknown; allowed: "
                                  f"{list(PRECISIONS)}")
        self._precision = precision
        self.channels_last = channels_last and self.device.type == "cuda"
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.forward_batches = 0  # instrumentation: U-Net forward passes run
        self.forward_images = 0  # instrumentation: images passed through the U-Net

    @property
    def precision(self) -> str:
        """The precision the U-Net runs in (part of a cache entry's key)."""
        return self._precision or precision_for(self.device)

    @property
    def num_blocks(self) -> int:
        return len(block_modules(self.model))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def noised(self, x0: torch.Tensor, t: int, *, indices: Sequence[int] | None = None,
               noise: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        """``q_sample(x0, t, noise)`` with the contract's seeded noise when ``noise`` is None."""
        if noise is None:
            idx = list(range(len(x0))) if indices is None else [int(i) for i in indices]
            if len(idx) != len(x0):
                raise ExtractionError(f"indices has {len(idx)} entries for {len(x0)} images")
            noise = seeded_noise(x0.shape, t, idx, seed)
        if noise.shape != x0.shape:
            raise ExtractionError(f"noise shape {tuple(noise.shape)} != image shape {tuple(x0.shape)}")
        tt = torch.full((len(x0),), t, dtype=torch.long, device=x0.device)
        return self.diffusion.q_sample(x0, tt, noise=noise.to(x0.device, x0.dtype))

    def extract(
        self,
        x0: torch.Tensor,
        t: int,
        blocks: Sequence[int] | Mapping[int, int | None],
        *,
        indices: Sequence[int] | None = None,
        noise: torch.Tensor | None = None,
        pool: int | None = None,
        seed: int = 0,
    ) -> dict[int, torch.Tensor]:
        """Features of ``blocks`` for images ``x0`` noised to step ``t``: one forward pass
        that stops after the deepest block asked, each map pooled as soon as it is made,
        and no map kept past its last use.

        :param x0: an [N x 3 x H x W] Tensor of images in [-1, 1].
        :param t: diffusion step 0..T-1.
        :param blocks: block numbers (paper numbering, 1..N), or block -> its own pool size.
        :param indices: dataset indices of the images (keys of their seeded noise).
        :param noise: explicit noise [N x 3 x H x W], used as is.
        :param pool: adaptive-average-pool every map of a block list to pool x pool; None
            keeps full maps.
        :return: block number -> [N x C x h x w] float32 Tensor on the model's device.
        """
        if isinstance(blocks, Mapping):
            pools = {b: check_pool(p) for b, p in blocks.items()}
        else:
            pools = dict.fromkeys(blocks, check_pool(pool))
        wanted = check_blocks(self.model, list(pools))
        check_timestep(self.diffusion, t)
        device = self.device
        x0 = x0.to(device, torch.float32)
        out: dict[int, torch.Tensor] = {}

        def keep(b: int, h: torch.Tensor) -> None:
            if b in pools:  # pooled first: a bf16 map is never copied whole to float32
                out[b] = pool_map(h, pools[b]).float().contiguous()

        # no_grad, not inference_mode: a head may train on these features directly
        with torch.no_grad(), autocast_for(device, self.precision):
            x_t = self.noised(x0, t, indices=indices, noise=noise, seed=seed)
            if self.channels_last:
                x_t = x_t.contiguous(memory_format=torch.channels_last)
            ts = model_timesteps(self.diffusion, torch.full((len(x0),), t, dtype=torch.long,
                                                            device=device))
            run_blocks(self.model, x_t, ts, upto=wanted[-1], on_block=keep)
        self.forward_batches += 1
        self.forward_images += len(x0)
        return out


# keyed by the model object itself (weakly): an id() would be reused by a later model
_SIZES: weakref.WeakKeyDictionary[torch.nn.Module, dict[int, tuple[int, int]]] = (
    weakref.WeakKeyDictionary()
)


class _Blocks(torch.nn.Module):
    """``run_blocks`` as a module's forward (what ``functional_call`` can run)."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, upto: int, on_block) -> torch.Tensor:
        return run_blocks(self.unet, x, timesteps, upto=upto, on_block=on_block)


def block_shapes(model: torch.nn.Module) -> dict[int, tuple[int, int]]:
    """Block number -> ``(channels, side)`` of its output map at the model's image size (one
    1-image pass on the meta device, with the model's weights swapped for meta tensors for
    the call: nothing is computed; remembered per model)."""
    if model not in _SIZES:
        shapes: dict[int, tuple[int, int]] = {}
        wrapper = _Blocks(model)
        meta = {k: torch.empty_like(v, device="meta")
                for k, v in wrapper.state_dict(keep_vars=True).items()}
        x = torch.zeros(1, 3, model.image_size, model.image_size, device="meta")
        with torch.no_grad():
            functional_call(wrapper, meta, (x, torch.zeros(1, dtype=torch.long, device="meta"),
                                            len(block_modules(model)),
                                            lambda b, h: shapes.__setitem__(
                                                b, (h.shape[1], h.shape[-1]))))
        _SIZES[model] = shapes
    return _SIZES[model]


def block_sizes(model: torch.nn.Module) -> dict[int, int]:
    """Block number -> side of its output map at the model's image size."""
    return {b: side for b, (_, side) in block_shapes(model).items()}
