"""Feature extraction (trainables.features): block numbering, early exit, seeded noise, the
U-Net's inputs, pooling and the errors a user can cause."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from difftune.trainables.errors import UserError
from difftune.trainables.model import features
from difftune.trainables.model.features import (
    ExtractionError,
    Extractor,
    block_modules,
    block_sizes,
    seeded_noise,
)
from difftune.trainables.model.unet import build


def images(n: int, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def demo(demo_unet):
    model, diffusion = demo_unet
    return model, diffusion, Extractor(model, diffusion)


class Recorder:
    """Forward hooks that note which modules ran (and keep their outputs)."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.ran: dict[str, torch.Tensor] = {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, args, output):
            self.ran[name] = output.detach().clone()

        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def named_blocks(model) -> dict[str, torch.nn.Module]:
    return {str(b): m for b, m in enumerate(block_modules(model), start=1)}


# --------------------------------------------------------------------------------------
# block numbering: the driven block loop equals guided-diffusion's own forward
# --------------------------------------------------------------------------------------


def test_block_numbering_follows_forward_order(demo):
    model, _, ex = demo
    mods = block_modules(model)
    n_in = len(model.input_blocks)
    assert ex.num_blocks == n_in + 1 + len(model.output_blocks) == len(mods)
    assert mods[0] is model.input_blocks[0]
    assert mods[n_in - 1] is model.input_blocks[-1]
    assert mods[n_in] is model.middle_block
    assert mods[n_in + 1] is model.output_blocks[0]
    assert mods[-1] is model.output_blocks[-1]


def test_extracted_blocks_equal_guided_diffusion_forward(demo):
    """Hook guided-diffusion's own UNetModel.forward (called the way its training loop calls
    it: through the diffusion's wrapped model) and compare every block output."""
    model, diffusion, ex = demo
    x0, t = images(4), 150
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    n = ex.num_blocks
    rec = Recorder(named_blocks(model))
    try:
        with torch.no_grad():
            tt = torch.full((len(x0),), t, dtype=torch.long)
            x_t = diffusion.q_sample(x0, tt, noise=noise)
            out = diffusion._wrap_model(model)(x_t, tt)
    finally:
        rec.close()
    assert out.shape[1] == model.out_channels
    assert sorted(int(k) for k in rec.ran) == list(range(1, n + 1))

    feats = ex.extract(x0, t, list(range(1, n + 1)), noise=noise)
    assert sorted(feats) == list(range(1, n + 1))
    for b in range(1, n + 1):
        torch.testing.assert_close(feats[b], rec.ran[str(b)], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, b=b: f"block {b}: {m}")


# --------------------------------------------------------------------------------------
# early exit
# --------------------------------------------------------------------------------------


def test_encoder_blocks_only_never_run_middle_or_decoder(demo):
    model, _, ex = demo
    later = {"middle": model.middle_block}
    later.update({f"out{k}": m for k, m in enumerate(model.output_blocks)})
    # the deepest requested block is 4: its later siblings in input_blocks must not run either
    later.update({f"in{k}": model.input_blocks[k] for k in range(4, len(model.input_blocks))})
    earlier = {f"in{k}": model.input_blocks[k] for k in range(4)}
    rec_later, rec_earlier = Recorder(later), Recorder(earlier)
    try:
        feats = ex.extract(images(2), 10, [4, 2])
    finally:
        rec_later.close()
        rec_earlier.close()
    assert sorted(feats) == [2, 4]
    assert rec_later.ran == {}, f"ran after the deepest requested block: {sorted(rec_later.ran)}"
    assert sorted(rec_earlier.ran) == ["in0", "in1", "in2", "in3"]


def test_decoder_block_stops_after_it(demo):
    model, _, ex = demo
    n_in = len(model.input_blocks)
    block = n_in + 3  # output_blocks[1]
    rec = Recorder({f"out{k}": m for k, m in enumerate(model.output_blocks)}
                   | {"middle": model.middle_block})
    try:
        ex.extract(images(2), 10, [block])
    finally:
        rec.close()
    assert sorted(rec.ran) == ["middle", "out0", "out1"]


def test_one_forward_pass_serves_all_blocks(demo):
    model, _, ex = demo
    calls = []
    handle = model.input_blocks[0].register_forward_hook(lambda *a: calls.append(1))
    try:
        before = ex.forward_batches
        feats = ex.extract(images(3), 10, [1, 5, ex.num_blocks])
    finally:
        handle.remove()
    assert sorted(feats) == [1, 5, ex.num_blocks]
    assert len(calls) == 1
    assert ex.forward_batches == before + 1


# --------------------------------------------------------------------------------------
# noise and timesteps
# --------------------------------------------------------------------------------------


def test_same_image_same_features_in_any_batch_composition(demo):
    _, _, ex = demo
    x = images(8, seed=3)
    indices = [100, 7, 42, 3, 999, 12, 5, 64]
    batch = ex.extract(x, 200, [3, 10], indices=indices, pool=2, seed=5)
    alone = ex.extract(x[4:5], 200, [3, 10], indices=[999], pool=2, seed=5)
    reordered = ex.extract(x.flip(0)[:5], 200, [3, 10], indices=indices[::-1][:5], pool=2, seed=5)
    for b in (3, 10):
        torch.testing.assert_close(alone[b][0], batch[b][4], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reordered[b][3], batch[b][4], rtol=1e-5, atol=1e-6)
    # the noised inputs themselves are bit-identical
    a = ex.noised(x, 200, indices=indices, seed=5)[4]
    b = ex.noised(x[4:5], 200, indices=[999], seed=5)[0]
    assert torch.equal(a, b)


def test_default_indices_are_batch_positions(demo):
    _, _, ex = demo
    x = images(3)
    assert torch.equal(ex.noised(x, 50), ex.noised(x, 50, indices=[0, 1, 2]))


def test_seeded_noise_is_a_pure_function_of_seed_t_index():
    a = seeded_noise((3, 3, 8, 8), 90, [0, 1, 2], seed=0)
    assert torch.equal(a, seeded_noise((3, 3, 8, 8), 90, [0, 1, 2], seed=0))
    assert torch.equal(a[1], seeded_noise((1, 3, 8, 8), 90, [1], seed=0)[0])
    # different images, seeds and timesteps get different noise
    assert not torch.equal(a[0], a[1])
    assert not torch.equal(a, seeded_noise((3, 3, 8, 8), 90, [0, 1, 2], seed=1))
    assert not torch.equal(a, seeded_noise((3, 3, 8, 8), 91, [0, 1, 2], seed=0))
    # it is standard normal noise
    big = seeded_noise((64, 3, 16, 16), 5, range(64), seed=0)
    assert abs(big.mean().item()) < 0.05 and abs(big.std().item() - 1) < 0.05


def test_different_seed_or_t_gives_different_features(demo):
    _, _, ex = demo
    x = images(2)
    base = ex.extract(x, 100, [2], seed=0)[2]
    assert not torch.allclose(base, ex.extract(x, 100, [2], seed=1)[2])
    assert not torch.allclose(base, ex.extract(x, 101, [2], seed=0)[2])
    torch.testing.assert_close(base, ex.extract(x, 100, [2], seed=0)[2], rtol=0, atol=0)


def test_explicit_noise_is_what_the_unet_sees(demo):
    model, diffusion, ex = demo
    x0, t = images(3), 300
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9))
    seen = []
    handle = model.input_blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append(args[0].detach().clone()))
    try:
        ex.extract(x0, t, [1], noise=noise)
    finally:
        handle.remove()
    expected = diffusion.q_sample(x0, torch.full((3,), t, dtype=torch.long), noise=noise)
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)
    # seeded noise differs from this explicit noise, so the input would differ without it
    assert not torch.allclose(ex.noised(x0, t), expected)


def _timesteps_seen(monkeypatch, ex, x0, t) -> torch.Tensor:
    seen = []
    real = features.timestep_embedding

    def spy(timesteps, dim, *args, **kwargs):
        seen.append(timesteps.detach().clone())
        return real(timesteps, dim, *args, **kwargs)

    monkeypatch.setattr(features, "timestep_embedding", spy)
    ex.extract(x0, t, [1])
    monkeypatch.setattr(features, "timestep_embedding", real)
    assert len(seen) == 1
    return seen[0]


def _timesteps_guided_diffusion_passes(model, diffusion, x0, t) -> torch.Tensor:
    """What guided-diffusion's own training path hands the U-Net for step ``t``."""
    seen = []
    handle = model.register_forward_pre_hook(lambda m, args: seen.append(args[1].clone()))
    try:
        with torch.no_grad():
            diffusion._wrap_model(model)(x0, torch.full((len(x0),), t, dtype=torch.long))
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("t", [0, 37, 999])
def test_unet_gets_the_diffusions_scaled_timestep(demo, monkeypatch, t):
    model, diffusion, ex = demo
    x0 = images(2)
    got = _timesteps_seen(monkeypatch, ex, x0, t)
    want = _timesteps_guided_diffusion_passes(model, diffusion, x0, t)
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)


def test_respaced_and_rescaled_timesteps(monkeypatch, tiny_flags):
    """A model trained with timestep respacing and rescale_timesteps gets the mapped,
    rescaled step (not the raw index) -- and t counts the respaced steps."""
    model, diffusion = build(tiny_flags | dict(diffusion_steps=2000, timestep_respacing="250",
                                               rescale_timesteps=True))
    model.eval()
    ex = Extractor(model, diffusion)
    x0 = images(2)
    got = _timesteps_seen(monkeypatch, ex, x0, 100)
    want = _timesteps_guided_diffusion_passes(model, diffusion, x0, 100)
    # step 100 of 250 is mapped to a step of the 2000 and that is rescaled to 0..1000
    assert want[0].item() == diffusion.timestep_map[100] * 0.5 != 100
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=0)
    with pytest.raises(ExtractionError, match=r"0\.\.249"):
        ex.extract(x0, 250, [1])


# --------------------------------------------------------------------------------------
# pooling and outputs
# --------------------------------------------------------------------------------------


def test_pool_is_adaptive_average_pooling(demo):
    _, _, ex = demo
    x = images(3)
    blocks = [1, 10, ex.num_blocks]
    full = ex.extract(x, 60, blocks)
    for p in (1, 2, 3):
        pooled = ex.extract(x, 60, blocks, pool=p)
        for b in blocks:
            assert pooled[b].shape == (*full[b].shape[:2], p, p)
            torch.testing.assert_close(pooled[b], F.adaptive_avg_pool2d(full[b], p))


def test_outputs_are_float32_without_autograd(demo):
    _, _, ex = demo
    feats = ex.extract(images(2), 10, [1, 10])
    for f in feats.values():
        assert f.dtype == torch.float32
        assert not f.requires_grad
        assert not f.is_inference()  # a head may train on them directly (no_grad, not inference)


def test_block_sizes_match_extraction(demo):
    model, _, ex = demo
    feats = ex.extract(images(1), 10, list(range(1, ex.num_blocks + 1)))
    assert block_sizes(model) == {b: f.shape[-1] for b, f in feats.items()}


# --------------------------------------------------------------------------------------
# errors a user can cause
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [0, -1, "N+1", "3", 2.0, True])
def test_bad_block_names_the_valid_range(demo, block):
    _, _, ex = demo
    n = ex.num_blocks
    block = n + 1 if block == "N+1" else block
    with pytest.raises(ValueError, match=rf"1\.\.{n}\b") as info:
        ex.extract(images(1), 10, [5, block])
    assert isinstance(info.value, UserError)


def test_no_blocks_is_an_error(demo):
    _, _, ex = demo
    with pytest.raises(ExtractionError, match=r"1\.\.\d+"):
        ex.extract(images(1), 10, [])


@pytest.mark.parametrize("t", [1000, -1, 2.5, "10", None])
def test_bad_timestep(demo, t):
    _, diffusion, ex = demo
    assert diffusion.num_timesteps == 1000
    with pytest.raises(ExtractionError, match=r"0\.\.999"):
        ex.extract(images(1), t, [1])


@pytest.mark.parametrize("pool", [0, -2, 1.5, "2"])
def test_bad_pool(demo, pool):
    _, _, ex = demo
    with pytest.raises(ExtractionError, match="pool"):
        ex.extract(images(1), 10, [1], pool=pool)


def test_bad_noise_or_indices(demo):
    _, _, ex = demo
    with pytest.raises(ExtractionError, match="noise shape"):
        ex.extract(images(2), 10, [1], noise=torch.zeros(1, 3, 16, 16))
    with pytest.raises(ExtractionError, match="indices"):
        ex.extract(images(2), 10, [1], indices=[0, 1, 2])


def test_block_sizes_do_not_keep_models_alive(tiny_flags):
    import gc
    import weakref

    before = len(features._SIZES)
    model, _ = build(tiny_flags)
    assert block_sizes(model)[1] == tiny_flags["image_size"]
    assert len(features._SIZES) == before + 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    # remembered by the object, not by an id() that a later model could reuse
    assert len(features._SIZES) == before


# --------------------------------------------------------------------------------------
# memory: no map outlives its last use; half-precision maps pooled in float32
# --------------------------------------------------------------------------------------


def test_no_encoder_output_outlives_its_last_use(demo):
    """Stopping at decoder block 12 of 19: encoder blocks 1..7 feed decoder blocks 13..19,
    which never run, so their outputs are dropped at once; 8 and 9 go after blocks 12 and 11
    read them."""
    import weakref

    model, diffusion, _ = demo
    refs: dict[int, weakref.ref] = {}
    alive_at: dict[int, list[int]] = {}

    def on_block(b, h):
        refs[b] = weakref.ref(h)
        alive_at[b] = sorted(k for k, r in refs.items() if k < b and r() is not None)

    x = images(2)
    with torch.no_grad():
        features.run_blocks(model, x, torch.zeros(2, dtype=torch.long), upto=12,
                            on_block=on_block)
    # a block's input lives while it runs; block 6 is not kept: its reader (14) never runs
    assert alive_at[8] == [7]
    assert alive_at[11] == [8]  # block 8 waits for block 12; 9 was read by block 11
    assert alive_at[12] == []
    # a full pass keeps every skip connection until its reader
    with torch.no_grad():
        features.run_blocks(model, x, torch.zeros(2, dtype=torch.long), upto=19,
                            on_block=on_block)
    assert alive_at[9] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_half_precision_maps_are_pooled_in_float32():
    x = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    pooled = features.pool_map(x.bfloat16(), 4)
    assert pooled.dtype == torch.float32
    assert torch.allclose(pooled, F.adaptive_avg_pool2d(x.bfloat16().float(), 4), atol=1e-6)
    assert features.pool_map(x.bfloat16(), 3).shape == (2, 8, 3, 3)  # uneven: adaptive


def test_precision_is_fp32_on_cpu_and_bf16_can_be_asked(demo):
    model, diffusion, ex = demo
    assert features.precision_for("cpu") == "fp32" and ex.precision == "fp32"
    bf16 = Extractor(model, diffusion, precision="bf16")
    assert bf16.precision == "bf16"
    x = images(4)
    a = ex.extract(x, 90, [10], pool=2)[10]
    b = bf16.extract(x, 90, [10], pool=2)[10]
    assert b.dtype == torch.float32 and not torch.equal(a, b)  # it ran in bf16
    assert torch.allclose(a, b, rtol=0.1, atol=0.1 * float(a.abs().max()))
    with pytest.raises(ExtractionError, match="precision"):
        Extractor(model, diffusion, precision="fp8")
