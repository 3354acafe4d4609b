"""StyleGAN2 networks: modulated conv, equalized lr, mapping/truncation, style mixing, resampling,
shapes, precision, torch.compile and one training step."""

import itertools
import math

import pytest
import torch
from torch.nn import functional as F

from distgan.config import load_config
from distgan.errors import ConfigError, DistganError
from distgan.models import build_models, discriminator_blocks
from distgan.sampling import generate
from distgan.models.stylegan2 import MAPPING_LR
from distgan.models.layers import independent_sets
from distgan.models.stylegan2_layers import (Conv, FullyConnected, MinibatchStd, blur, demodulation_coefficients,
                                             downsample2d, fir_filter, modulated_conv2d, upsample2d)


def models(resolution=16, channels=3, classes=0, *extra):
    cfg = load_config(None, ["model.arch=stylegan2", f"data.resolution={resolution}", f"data.channels={channels}",
                             "model.g_width=4", "model.d_width=4", "model.z_dim=8", "model.mapping_layers=2",
                             f"model.conditional={str(classes > 0).lower()}", *extra])
    torch.manual_seed(0)
    return build_models(cfg.model, resolution, channels, classes)


def reference_upfirdn(x, up=1, down=1, pad=(0, 0)):
    """NVlabs' upfirdn2d, written out: zero insertion, zero padding, 4x4 [1,3,3,1] FIR (gain up^2), decimation."""
    n, c, h, w = x.shape
    if up > 1:
        stuffed = x.new_zeros(n, c, h * up, w * up)
        stuffed[..., ::up, ::up] = x
        x = stuffed
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    f = torch.tensor([1.0, 3.0, 3.0, 1.0])
    f = torch.outer(f, f) / 64 * up**2
    x = F.conv2d(x, f.flip(0, 1).expand(c, 1, 4, 4), groups=c)
    return x[..., ::down, ::down]


def test_modulated_conv_is_a_per_sample_conv():
    """The grouped conv (fused, sampling) and the batched conv of the training form (unfused) both
    equal a loop over samples, each convolved with its own modulated weight."""
    torch.manual_seed(0)
    x, weight, styles = torch.randn(3, 5, 8, 8), torch.randn(6, 5, 3, 3), torch.randn(3, 5)
    fir = fir_filter()
    for demodulate, up, fused in itertools.product((True, False), (1, 2), (True, False)):
        got = modulated_conv2d(x, weight, styles, demodulate=demodulate, up=up, fir=fir, fused=fused)
        want = []
        for i in range(3):
            w = weight * styles[i].view(1, -1, 1, 1)
            if demodulate:
                w = w / (w.square().sum(dim=(1, 2, 3), keepdim=True) + 1e-8).sqrt()
            if up == 1:
                want.append(F.conv2d(x[i:i + 1], w, padding=1))
            else:  # transposed conv (weights in, out), then the [1,3,3,1] filter with gain 4
                y = F.conv_transpose2d(x[i:i + 1], w.transpose(0, 1), stride=2)
                want.append(reference_upfirdn(y, pad=(1, 1)) * 4)
        want = torch.cat(want)
        assert got.shape == (3, 6, 8 * up, 8 * up)
        assert torch.allclose(got, want, atol=1e-5), (demodulate, up, fused)


def test_demodulation_gives_unit_output_variance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 64, 16, 16, generator=g)
    weight = torch.randn(32, 64, 3, 3, generator=g)
    styles = torch.randn(8, 64, generator=g) * 3 + 1  # far from unit styles: demodulation must undo them
    out = modulated_conv2d(x, weight, styles)[..., 1:-1, 1:-1]  # interior: no zero padding involved
    assert abs(out.var().item() - 1) < 0.08  # fixed seed; 50k values (1.026 here, about 1.01-1.03 for other seeds)
    raw = modulated_conv2d(x, weight, styles, demodulate=False)
    assert raw.var().item() > 10


@pytest.mark.parametrize("up, fused", list(itertools.product((1, 2), (False, True))))
def test_fp16_modulated_conv_with_512_channels_stays_finite_and_close_to_fp32(up, fused):
    """512 input channels and styles ~4: s^2 ||W||^2 summed in fp16 (~512 * 9 * 16) overflows 65504,
    and the layer used to return all zeros (rsqrt(inf) = 0) without an error. The tolerance is
    NVlabs' own fp16 error: stylegan2-ada-pytorch's modulated_conv2d (commit d72cc7d, run on CPU on
    these inputs, up=1) is off by 6.4e-4 (unfused) and 3.7e-4 (fused) of the largest fp32 output."""
    torch.manual_seed(0)
    x, weight, styles = torch.randn(4, 512, 8, 8), torch.randn(64, 512, 3, 3), 4 + 0.5 * torch.randn(4, 512)
    want = modulated_conv2d(x, weight, styles, up=up, fir=fir_filter(), fused=fused)
    with torch.autocast("cpu", dtype=torch.float16):  # fp32 weights, fp16 convolutions (the trainer's fp16)
        autocast = modulated_conv2d(x, weight, styles, up=up, fir=fir_filter(), fused=fused)
    # An fp16 model and fp16 inputs (DeepSpeed fp16)
    half = modulated_conv2d(x.half(), weight.half(), styles.half(), up=up, fir=fir_filter(), fused=fused)
    for got in (autocast, half):
        assert got.dtype == torch.float16 and torch.isfinite(got).all()
        assert (got.float() - want).abs().max() / want.abs().max() < 1e-3


def test_demodulation_coefficients_are_computed_in_fp32():
    """Under bf16 autocast the matmul of s^2 and ||W||^2 would run in bf16 (~0.4% off): it is fp32,
    from weights and styles of any dtype."""
    torch.manual_seed(0)
    weight, styles = torch.randn(16, 32, 3, 3), 1 + torch.rand(4, 32)
    want = 1 / (weight.unsqueeze(0) * styles.view(4, 1, 32, 1, 1)).square().sum(dim=(2, 3, 4)).add(1e-8).sqrt()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = demodulation_coefficients(weight, styles)
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-5)
    half = demodulation_coefficients(weight.half(), styles.half())
    assert half.dtype == torch.float32 and torch.allclose(half, want, rtol=2e-3)


def test_equalized_learning_rate():
    torch.manual_seed(0)
    fc = FullyConnected(400, 300, lr_multiplier=0.01)
    assert fc.weight_gain == pytest.approx(0.01 / 20) and fc.bias_gain == 0.01
    assert fc.weight.std().item() == pytest.approx(100, rel=0.02)  # stored ~ N(0, 1) / lr_multiplier
    x = torch.randn(4, 400)
    assert torch.allclose(fc(x), x @ (fc.weight * 0.01 / 20).t(), atol=1e-5)  # bias 0 at init
    conv = Conv(16, 8, 3, act=False)
    assert conv.weight_gain == pytest.approx(1 / math.sqrt(16 * 9))
    assert conv.weight.std().item() == pytest.approx(1, rel=0.1)
    G, D = models(16)
    for layer in G.mapping.layers:  # the mapping network learns 100x slower (NVlabs' lr_multiplier)
        fan_in = layer.weight.shape[1]
        assert layer.bias_gain == MAPPING_LR == 0.01
        assert layer.weight_gain == pytest.approx(0.01 / math.sqrt(fan_in))
        assert layer.weight.std().item() == pytest.approx(100, rel=0.25)


def test_truncation_and_w_avg():
    G, _ = models(16)
    G.eval()
    G.noise_mode = "const"
    G.mapping.w_avg.copy_(torch.randn(8))
    z = torch.randn(2, 8)
    ws = G.mapping(z)
    assert ws.shape == (2, G.num_ws, 8) and G.w_dim == 8 and G.num_ws == 6
    assert torch.equal(G.mapping(z, truncation_psi=1.0), ws)
    assert torch.allclose(G.mapping(z, truncation_psi=0.0), G.mapping.w_avg.expand(2, 6, 8))
    partial = G.mapping(z, truncation_psi=0.0, truncation_cutoff=2)
    assert torch.allclose(partial[:, :2], G.mapping.w_avg.expand(2, 2, 8)) and torch.equal(partial[:, 2:], ws[:, 2:])
    images = G(torch.randn(2, 8), truncation_psi=0.0)
    assert torch.allclose(images[0], images[1], atol=1e-6)
    before = G.mapping.w_avg.clone()
    G(z)
    assert torch.equal(G.mapping.w_avg, before)  # eval: w_avg stays
    G.train()
    G(z)
    w = G.mapping(z)[:, 0]
    assert torch.allclose(G.mapping.w_avg, w.mean(0).lerp(before, 0.995), atol=1e-6)
    G.mapping(z)  # calling the mapping alone does not update it
    assert torch.allclose(G.mapping.w_avg, w.mean(0).lerp(before, 0.995), atol=1e-6)
    G.noise_mode = "none"
    assert G.noise_mode == "none" and G.synthesis.noise_mode == "none"
    with pytest.raises(ValueError, match="noise_mode"):
        G.noise_mode = "sometimes"


def test_noise_modes():
    G, _ = models(16)
    G.eval()
    for layer in G.modules():
        if hasattr(layer, "noise_strength"):
            layer.noise_strength.data.fill_(0.5)
    z = torch.randn(2, 8)
    G.noise_mode = "random"
    assert not torch.allclose(G(z), G(z))
    for mode in ("const", "none"):
        G.noise_mode = mode
        assert torch.equal(G(z), G(z))


def test_style_mixing():
    G, _ = models(16, 3, 5, "model.style_mixing_prob=1")
    assert G.style_mixing_prob == 1.0
    G.train()
    z, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    own = G.mapping(z, labels)
    cutoffs = set()
    for _ in range(12):
        avg = G.mapping.w_avg.clone()
        images, ws = G(z, labels, return_ws=True)
        assert images.shape == (4, 3, 16, 16) and ws.shape == own.shape
        same = torch.isclose(ws, own, atol=1e-6).all(dim=2).all(dim=0)  # (num_ws,) rows that came from z
        cutoff = int(same.sum())
        assert 1 <= cutoff < G.num_ws and same[:cutoff].all() and not same[cutoff:].any()
        assert torch.allclose(ws[:, cutoff:], ws[:, cutoff:cutoff + 1].expand_as(ws[:, cutoff:]))  # one other w
        # w_avg moved by this batch's own w only, not by the second latent's
        assert torch.allclose(G.mapping.w_avg, own[:, 0].mean(0).lerp(avg, 0.995), atol=1e-6)
        cutoffs.add(cutoff)
    assert len(cutoffs) > 1
    G.eval()  # mixing is a training-time regularizer
    assert torch.allclose(G(z, labels, return_ws=True)[1], own)
    G2, _ = models(16, 3, 0)
    G2.train()
    _, ws = G2(z, return_ws=True)
    assert torch.equal(ws, ws[:, :1].expand_as(ws))  # probability 0: every row is the same w


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("classes", [0, 5])
def test_shapes_for_every_variant(resolution, channels, classes):
    G, D = models(resolution, channels, classes, "model.g_width=2", "model.d_width=2")
    z = torch.randn(2, 8)
    labels = torch.tensor([0, 4]) if classes else None
    images = G(z, labels)
    assert images.shape == (2, channels, resolution, resolution)
    logits = D(images, labels)
    assert logits.shape == (2,) and torch.isfinite(logits).all()
    assert G.num_classes == D.num_classes == classes and G.z_dim == 8
    assert G.num_ws == 2 * (int(math.log2(resolution)) - 1)
    assert len(discriminator_blocks("stylegan2", D)) == int(math.log2(resolution)) - 1  # blocks + epilogue


def test_256_widths_and_w_dim():
    G, D = models(256, 3, 0, "model.widths=[4,4,4,4,2,2,1]", "model.w_dim=6")
    assert G.w_dim == 6 and G.synthesis.blocks[0].const.shape == (4, 4, 4)
    assert D.blocks[0].from_rgb.weight.shape == (1, 3, 1, 1)
    assert G(torch.randn(1, 8)).shape == (1, 3, 256, 256)
    assert D(torch.randn(1, 3, 256, 256)).shape == (1,)
    with pytest.raises(ConfigError):
        load_config(None, ["model.arch=stylegan2", "model.style_mixing_prob=1.5"])


@pytest.mark.parametrize("layout", ["strided", "consecutive"])
@pytest.mark.parametrize("batch", [1, 3, 4, 6, 8])
def test_minibatch_std(batch, layout):
    torch.manual_seed(0)
    x = torch.randn(batch, 5, 4, 4)
    out = MinibatchStd(4, layout)(x)
    assert out.shape == (batch, 6, 4, 4) and torch.equal(out[:, :5], x)
    group = {1: 1, 3: 3, 4: 4, 6: 3, 8: 4}[batch]
    groups = batch // group
    for i in range(batch):  # strided (NVlabs): i, i + N/G, ...; consecutive: its neighbours, group i // G
        members = x[i % groups::groups] if layout == "strided" else x[i // group * group:(i // group + 1) * group]
        want = (members.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()
        assert torch.allclose(out[i, 5], want.expand(4, 4), atol=1e-6)
    _, D = models(16)
    assert D(torch.randn(batch, 3, 16, 16)).shape == (batch,)


@pytest.mark.parametrize("layout", ["strided", "consecutive"])
def test_minibatch_std_never_mixes_reals_with_fakes_in_one_forward(layout):
    """The objective runs D on cat(reals, fakes) inside independent_sets(2): each half's statistics
    are its own, in either group layout."""
    torch.manual_seed(0)
    real, fake = torch.randn(8, 5, 4, 4), torch.zeros(8, 5, 4, 4)
    with independent_sets(2):
        both = MinibatchStd(4, layout)(torch.cat([real, fake]))
    assert torch.equal(both[:8], MinibatchStd(4, layout)(real))
    assert torch.allclose(both[8:, 5], torch.full((8, 4, 4), 1e-4))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8])
def test_d_on_independent_sets_equals_separate_forwards(n):
    """D(cat(reals, fakes)) inside `independent_sets(2)` gives the logits of D(reals) and D(fakes)
    run alone (NVlabs' separate forwards): per set, groups of min(mbstd_group, n) (4 here), below,
    at and above the group size. Without it, n=2 would group 2 reals with 2 fakes."""
    _, D = models(16, 3, 0, "model.mbstd_group=4")
    torch.manual_seed(1)
    real, fake = torch.randn(n, 3, 16, 16), 0.1 * torch.randn(n, 3, 16, 16)
    with independent_sets(2):
        both = D(torch.cat([real, fake]))
    assert torch.allclose(both, torch.cat([D(real), D(fake)]), atol=1e-6, rtol=1e-5)
    if n in (1, 2, 6):  # the plain concatenated forward (groups of min(4, 2n)) crosses the sets
        assert not torch.allclose(D(torch.cat([real, fake])), both, atol=1e-4)


def test_independent_sets_is_undone_on_exit_and_rejects_uneven_batches():
    layer, x = MinibatchStd(4, "consecutive"), torch.randn(6, 2, 4, 4)
    with pytest.raises(ValueError, match="6 cannot be split into 4 equal sets"), independent_sets(4):
        layer(x)
    with independent_sets(2):
        split = layer(x)[:, 2]
    whole = layer(x)[:, 2]  # back to one set of 6: groups of 3 (0-2, 3-5), as the split
    assert torch.allclose(split, whole)
    assert torch.allclose(layer(x[:4])[:, 2], layer(x[:4])[0, 2].expand(4, 4, 4))  # one group of 4 again


def test_fir_resampling():
    f = fir_filter()
    assert torch.allclose(f.sum(), torch.tensor(1.0)) and torch.allclose(f[0, 0, 0], torch.tensor([1, 3, 3, 1]) / 64)
    x = torch.full((2, 3, 8, 8), 0.7)
    up, down = upsample2d(x, f), downsample2d(x, f)
    assert up.shape == (2, 3, 16, 16) and down.shape == (2, 3, 4, 4)
    # a constant image stays constant away from the zero-padded border
    assert torch.allclose(up[..., 2:-2, 2:-2], torch.full_like(up[..., 2:-2, 2:-2], 0.7), atol=1e-6)
    assert torch.allclose(down[..., 1:-1, 1:-1], torch.full_like(down[..., 1:-1, 1:-1], 0.7), atol=1e-6)
    assert torch.allclose(blur(x, f, pad=2)[..., 2:-2, 2:-2], torch.full((2, 3, 5, 5), 0.7), atol=1e-6)
    # ... and both are exactly NVlabs' upfirdn2d.upsample2d / downsample2d
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(upsample2d(x, f), reference_upfirdn(x, up=2, pad=(2, 1)), atol=1e-6)
    assert torch.allclose(downsample2d(x, f), reference_upfirdn(x, down=2, pad=(1, 1)), atol=1e-6)
    # D's downsampling 3x3 conv: blur (pad 2), then a stride-2 conv, keeping 8 -> 4
    assert Conv(3, 4, 3, down=2)(x).shape == (2, 4, 4, 4)


def test_runs_in_bf16_and_under_autocast():
    G, D = models(16, 3, 5)
    z, labels = torch.randn(2, 8), torch.tensor([1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = D(G(z, labels), labels)
        assert torch.isfinite(out.float()).all()
    G, D = G.to(torch.bfloat16), D.to(torch.bfloat16)
    images = G(z.bfloat16(), labels, truncation_psi=0.7)
    out = D(images.bfloat16(), labels)  # the DeepSpeed backend casts D's inputs so
    # The image path (skip connections) stays fp32, as NVlabs', even in a bf16 model.
    assert images.dtype == torch.float32 and out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2.5e-2), (torch.float16, 4e-3)])
def test_lowp_generator_adds_its_image_in_fp32(dtype, tolerance):
    """With `lowp_stages`, ToRGB convolves in the block's precision but the skip path sums the
    upsampled image and ToRGB's output in fp32 (NVlabs): G's output is fp32, equal to an fp32 sum
    of the blocks' ToRGB outputs, and within `tolerance` (of the largest value; bf16 has 8 bits of
    mantissa) of the fp32 generator's output."""
    G, _ = models(32, 3, 0, "model.lowp_stages=2", "model.conv_clamp=256", "model.g_width=8")
    G.eval()
    G.noise_mode = "const"
    rgb = []
    for block in G.synthesis.blocks:
        block.torgb.register_forward_hook(lambda module, args, out: rgb.append(out))
    z = torch.randn(4, 8)
    want = G(z)
    rgb.clear()
    with torch.autocast("cpu", dtype=dtype):
        got = G(z)
    assert got.dtype == torch.float32 and [y.dtype for y in rgb] == [torch.float32] * 2 + [dtype] * 2
    img = rgb[0].float()
    for y in rgb[1:]:
        img = upsample2d(img, fir_filter()) + y.float()
    assert torch.allclose(got, img, atol=1e-6)
    assert (got - want).abs().max() / want.abs().max() < tolerance


def test_lowp_stages_keep_lower_blocks_in_fp32():
    G, D = models(32, 3, 5, "model.lowp_stages=1", "model.conv_clamp=256")
    seen = {}

    def record(name):
        return lambda module, args, out: seen.__setitem__(name, (args[0].dtype, out.dtype))

    G.synthesis.blocks[1].conv1.register_forward_hook(record("G 8x8"))
    G.synthesis.blocks[3].conv1.register_forward_hook(record("G 32x32"))
    D.blocks[0].conv0.register_forward_hook(record("D 32x32"))
    D.blocks[1].conv0.register_forward_hook(record("D 16x16"))
    D.epilogue.conv.register_forward_hook(record("D 4x4"))
    z, labels = torch.randn(2, 8), torch.tensor([1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = D(G(z, labels), labels)
    fp32, bf16 = (torch.float32, torch.float32), torch.bfloat16
    assert seen["G 8x8"] == seen["D 16x16"] == seen["D 4x4"] == fp32 and out.dtype == torch.float32
    assert seen["G 32x32"][1] == seen["D 32x32"][1] == bf16
    G0, D0 = models(32, 3, 5, "model.lowp_stages=0")  # every block follows autocast
    G0.synthesis.blocks[1].conv1.register_forward_hook(record("G0 8x8"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        D0(G0(z, labels), labels)
    assert seen["G0 8x8"][1] == bf16
    seen.clear()
    G(z, labels)  # without autocast nothing changes dtype
    assert seen["G 32x32"] == fp32


def test_torch_compile_matches_eager():
    G, D = models(16, 3, 5)
    G.eval()
    G.noise_mode = "const"
    z, labels = torch.randn(2, 8), torch.tensor([1, 3])
    x = torch.randn(2, 3, 16, 16)
    cg, cd = torch.compile(G, backend="aot_eager"), torch.compile(D, backend="aot_eager")
    assert torch.allclose(cg(z, labels, truncation_psi=0.5), G(z, labels, truncation_psi=0.5), atol=1e-5)
    assert torch.allclose(cd(x, labels), D(x, labels), atol=1e-5)
    # The compiled D follows `independent_sets` (a guard on its value), not the graph traced above.
    with independent_sets(2):
        split = cd(x, labels)
    alone = torch.cat([D(x[:1], labels[:1]), D(x[1:], labels[1:])])
    assert torch.allclose(split, alone, atol=1e-5) and not torch.allclose(split, D(x, labels), atol=1e-4)
    # return_ws (the path-length penalty) runs eager inside the compiled G: ws is in the autograd
    # graph and the double backward works
    images, ws = cg(z, labels, return_ws=True)
    (grads,) = torch.autograd.grad((images * torch.randn_like(images)).sum(), ws, create_graph=True)
    grads.square().sum().backward()
    assert grads.shape == ws.shape and G.mapping.layers[0].weight.grad.abs().sum() > 0


def test_one_training_step_reaches_every_parameter():
    G, D = models(16, 3, 5, "model.style_mixing_prob=0.5")
    G.train(), D.train()
    z, labels = torch.randn(4, 8), torch.tensor([0, 1, 2, 3])
    real = torch.randn(4, 3, 16, 16)
    fake = G(z, labels)
    d_loss = F.softplus(D(fake.detach(), labels)).mean() + F.softplus(-D(real, labels)).mean()
    d_loss.backward()
    g_loss = F.softplus(-D(fake, labels)).mean()
    g_grads = torch.autograd.grad(g_loss, list(G.parameters()), allow_unused=True)
    for (name, p), g in zip(G.named_parameters(), g_grads):
        assert g is not None and torch.isfinite(g).all(), name
        if "noise_strength" not in name and "bias" not in name:
            assert g.abs().sum() > 0, name
    assert any(g.abs().sum() > 0 for (name, _), g in zip(G.named_parameters(), g_grads) if "noise_strength" in name)
    for name, p in D.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert torch.isfinite(d_loss) and torch.isfinite(g_loss)


def test_sampling_with_truncation_and_its_error_on_other_archs():
    """`distgan sample --truncation`: psi=0 gives every latent the average w's image; psi=1 changes
    nothing; an arch without a mapping network says so instead of failing on an argument."""
    G, _ = models(16, 3, 0, "model.noise_mode=const")
    G.mapping.w_avg.normal_()
    z = torch.randn(3, 8)
    average = generate(G, z, None, truncation_psi=0.0)
    assert torch.allclose(average[0], average[1], atol=1e-5) and torch.allclose(average[0], average[2], atol=1e-5)
    assert torch.equal(generate(G, z, None, truncation_psi=1.0), generate(G, z, None))
    assert not torch.allclose(generate(G, z, None)[0], generate(G, z, None)[1])
    dcgan, _ = build_models(load_config(None, ["data.resolution=16"]).model, 16, 3, 0)
    with pytest.raises(DistganError, match="mapping network"):
        generate(dcgan, z[:, :1].expand(3, dcgan.z_dim).contiguous(), None, truncation_psi=0.7)
