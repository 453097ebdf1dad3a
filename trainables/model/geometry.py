"""The shape of a guided-diffusion U-Net in the paper's block numbering, from its flags
alone (no weights, no forward pass): how many blocks, which one is the middle block, how
many diffusion steps.

Blocks are numbered 1..N in forward order: ``input_blocks`` (the encoder), the
``middle_block``, then ``output_blocks`` (the decoder). The encoder and the decoder have the
same number of blocks, so the middle block is ``(N + 1) / 2`` (19 of 37 for ``paper256``,
10 of 19 for the demo U-Net), and decoder block ``b`` mirrors encoder block ``N + 1 - b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from difftune.trainables.errors import UserError

#: guided-diffusion's default channel multipliers per image size (``create_model``)
DEFAULT_LEVELS = {512: 7, 256: 6, 128: 5, 64: 4}


@dataclass(frozen=True)
class Geometry:
    """Blocks and timesteps of a U-Net.

    :param num_blocks: N, blocks 1..N.
    :param steps: diffusion steps T (t is 0..T-1), after any respacing.
    :param image_size: side of the square images the U-Net takes.
    """

    num_blocks: int
    steps: int
    image_size: int

    @property
    def middle(self) -> int:
        """The middle block's number."""
        return (self.num_blocks + 1) // 2

    @property
    def decoder(self) -> range:
        """Decoder (output) block numbers."""
        return range(self.middle + 1, self.num_blocks + 1)

    def mirror(self, block: int) -> int:
        """The encoder block mirroring decoder block ``block`` (DifFeed adds feedback there)."""
        return self.num_blocks + 1 - block


def geometry_of_flags(flags: dict[str, Any]) -> Geometry:
    """:class:`Geometry` of complete guided-diffusion flags (``unet.full_flags``)."""
    mult = flags["channel_mult"]
    if mult:
        levels = len(str(mult).split(","))
    else:
        levels = DEFAULT_LEVELS.get(int(flags["image_size"]))
        if levels is None:
            raise UserError(f"image_size {flags['image_size']} needs an explicit channel_mult")
    per_side = levels * (int(flags["num_res_blocks"]) + 1)  # encoder = decoder blocks
    steps = int(flags["diffusion_steps"])
    if flags.get("timestep_respacing"):
        # guided-diffusion (and through it torch's U-Net code) only for a respaced model
        from guided_diffusion.respace import space_timesteps

        steps = len(space_timesteps(steps, str(flags["timestep_respacing"])))
    return Geometry(num_blocks=2 * per_side + 1, steps=steps,
                    image_size=int(flags["image_size"]))


def geometry_of_model(model: torch.nn.Module, diffusion: Any = None) -> Geometry:
    """:class:`Geometry` of a built U-Net (and its diffusion, for the steps)."""
    n = len(model.input_blocks) + 1 + len(model.output_blocks)
    steps = diffusion.num_timesteps if diffusion is not None else 0
    return Geometry(num_blocks=n, steps=steps, image_size=int(model.image_size))
