"""StyleGAN2's layers in plain PyTorch (no custom CUDA ops), after NVlabs' stylegan2-ada-pytorch.

- Equalized learning rate: `FullyConnected` and `Conv` store weights ~ N(0, 1) / lr_multiplier and
  multiply them at run time by lr_multiplier / sqrt(fan_in), so Adam's per-parameter step acts on
  the same scale in every layer (and `lr_multiplier` scales the effective learning rate).
- `modulated_conv2d`: style-modulated, optionally demodulated conv written as ONE grouped conv
  (the batch folded into the groups, weight (N*out, in, k, k)); with `up=2` a transposed conv
  followed by the [1,3,3,1] low-pass filter, as NVlabs' conv2d_resample.
- Resampling with the separable [1,3,3,1] FIR filter (outer product, normalized to sum 1; x4
  gain when upsampling), written as depthwise F.conv2d / F.conv_transpose2d with zero padding,
  exactly NVlabs' upfirdn2d.upsample2d / downsample2d.
- `bias_act`: bias, leaky ReLU(0.2) with gain sqrt(2), then an optional clamp (conv_clamp).
- `MinibatchStd`: D's minibatch standard deviation feature (NVlabs' strided groups, or consecutive ones).

Every weight is cast to the activations' dtype in the forward pass (bf16 models and autocast).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from distgan.models import layers

LEAK = 0.2
LRELU_GAIN = math.sqrt(2.0)  # NVlabs' def_gain for lrelu (not the exact He gain sqrt(2 / (1 + 0.2^2)))
FIR = (1.0, 3.0, 3.0, 1.0)


def fir_filter() -> Tensor:
    """The normalized 2-D [1,3,3,1] filter, (1, 1, 4, 4), summing to 1."""
    f = torch.tensor(FIR)
    f = torch.outer(f, f)
    return (f / f.sum()).view(1, 1, 4, 4)


def _depthwise(f: Tensor, x: Tensor) -> Tensor:
    return f.to(x.dtype).expand(x.shape[1], 1, 4, 4)


def blur(x: Tensor, f: Tensor, pad: int, gain: float = 1.0) -> Tensor:
    """Depthwise [1,3,3,1] filtering with `pad` zeros on every side (the filter is symmetric, so
    correlation and convolution agree)."""
    return F.conv2d(x, _depthwise(f, x) * gain, padding=pad, groups=x.shape[1])


def upsample2d(x: Tensor, f: Tensor) -> Tensor:
    """2x upsampling: zero insertion, then the filter with gain 4 (= upfirdn2d.upsample2d: pads 2
    before and 1 after the zero-stuffed signal, which is a stride-2 transposed conv with padding 1)."""
    return F.conv_transpose2d(x, _depthwise(f, x) * 4, stride=2, padding=1, groups=x.shape[1])


def downsample2d(x: Tensor, f: Tensor) -> Tensor:
    """2x downsampling: the filter with one zero of padding per side, every other pixel kept."""
    return F.conv2d(x, _depthwise(f, x), stride=2, padding=1, groups=x.shape[1])


def bias_act(x: Tensor, bias: Tensor | None, act: bool, gain: float = 1.0, clamp: float = 0.0) -> Tensor:
    """x + bias, leaky ReLU(0.2) x sqrt(2) when `act`, times `gain`, clamped to +-clamp (0: none)."""
    if bias is not None:
        x = x + bias.to(x.dtype).view(1, -1, *([1] * (x.dim() - 2)))
    if act:
        x = F.leaky_relu(x, LEAK)
        gain = gain * LRELU_GAIN
    if gain != 1:
        x = x * gain
    return x.clamp(-clamp, clamp) if clamp > 0 else x


class FullyConnected(nn.Module):
    """Equalized-lr linear layer: weight ~ N(0, 1/lr_multiplier^2), used as weight * weight_gain."""

    def __init__(self, cin: int, cout: int, act: bool = False, lr_multiplier: float = 1.0, bias_init: float = 0.0):
        super().__init__()
        self.act = act
        self.weight = nn.Parameter(torch.randn(cout, cin) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((cout,), float(bias_init)))  # NVlabs: stored unscaled
        self.weight_gain = lr_multiplier / math.sqrt(cin)
        self.bias_gain = lr_multiplier

    def forward(self, x: Tensor) -> Tensor:
        x = F.linear(x, self.weight.to(x.dtype) * self.weight_gain)
        return bias_act(x, self.bias * self.bias_gain, self.act)


class Conv(nn.Module):
    """Equalized-lr conv with bias and activation; `down=2` blurs then convolves with stride 2 (a
    1x1 conv downsamples first), as NVlabs' Conv2dLayer."""

    def __init__(self, cin: int, cout: int, kernel: int, act: bool = True, bias: bool = True, down: int = 1,
                 lr_multiplier: float = 1.0, conv_clamp: float = 0.0):
        super().__init__()
        self.act, self.down, self.conv_clamp, self.padding = act, down, conv_clamp, kernel // 2
        self.weight = nn.Parameter(torch.randn(cout, cin, kernel, kernel) / lr_multiplier)
        self.bias = nn.Parameter(torch.zeros(cout)) if bias else None
        self.weight_gain = lr_multiplier / math.sqrt(cin * kernel * kernel)
        self.bias_gain = lr_multiplier
        self.register_buffer("fir", fir_filter(), persistent=False)

    def forward(self, x: Tensor, gain: float = 1.0) -> Tensor:
        w = self.weight.to(x.dtype) * self.weight_gain
        if self.down == 1:
            x = F.conv2d(x, w, padding=self.padding)
        elif w.shape[-1] == 1:
            x = F.conv2d(downsample2d(x, self.fir), w)
        else:  # blur with pad (4 - 2 + 1) // 2 + k // 2 = 2 (k=3), then a stride-2 conv without padding
            x = F.conv2d(blur(x, self.fir, pad=1 + self.padding), w, stride=2)
        bias = self.bias * self.bias_gain if self.bias is not None else None
        return bias_act(x, bias, self.act, gain, self.conv_clamp * gain)


def modulated_conv2d(x: Tensor, weight: Tensor, styles: Tensor, demodulate: bool = True, up: int = 1,
                     fir: Tensor | None = None, fused: bool = True) -> Tensor:
    """Conv of each sample with its own weight: `weight` (out, in, k, k) scaled per input channel by
    `styles` (N, in), then (demodulate) each output filter rescaled to unit L2 norm, so unit-variance
    inputs give about unit-variance outputs. `up=2`: a stride-2 transposed conv, then the [1,3,3,1]
    filter (gain 4) restores the grid.

    `fused`: one grouped conv over the (1, N*in, H, W) batch with the per-sample weights. Otherwise
    (NVlabs' choice while training) the same result from one ordinary batched conv: scale the input
    channels by the styles, convolve with the shared weight, scale the output channels by the
    demodulation coefficients. On a 2-core CPU the batched form took 33 ms against 55 ms for the
    grouped one (forward + backward, batch 32, the CPU recipe's three layer sizes together).

    Reduced precision, as NVlabs: the convolution runs in the activations' (or autocast's) dtype,
    the demodulation coefficients are computed in fp32 (bf16 coefficients are ~0.5% off). When the
    conv runs in fp16, weight and styles are first pre-normalized (each output filter to max |W| =
    1/sqrt(in*k*k), each sample's styles to max |s| = 1): demodulation makes the result independent
    of these scales, but without them the unfused conv's output (before demodulation) and an fp16
    sum of s^2 ||W||^2 overflow (512 channels, styles ~4: 512 * 9 * 16 > 65504) and the layer
    returns zeros (rsqrt(inf)) without an error."""
    n, cin = styles.shape
    cout, _, k, _ = weight.shape
    if demodulate and _conv_dtype(x) == torch.float16:
        weight = weight.float() * (1 / math.sqrt(cin * k * k) / weight.float().abs().amax(dim=(1, 2, 3), keepdim=True))
        styles = styles.float() / styles.float().abs().amax(dim=1, keepdim=True)
    scale = demodulation_coefficients(weight, styles) if demodulate else None
    if not fused:
        x = _conv(x * styles.to(x.dtype).view(n, cin, 1, 1), weight.to(x.dtype), up, fir)
        return x * scale.to(x.dtype).view(n, cout, 1, 1) if demodulate else x
    w = weight.unsqueeze(0) * styles.view(n, 1, cin, 1, 1)  # (N, out, in, k, k), in the weights' dtype
    if demodulate:
        w = w * scale.to(w.dtype).view(n, cout, 1, 1, 1)
    w = w.to(x.dtype).reshape(n * cout, cin, k, k)
    x = _conv(x.reshape(1, n * cin, *x.shape[2:]), w, up, fir, groups=n)
    return x.reshape(n, cout, *x.shape[2:])


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for `device_type` (nothing to turn off where autocast does not exist, e.g. the
    meta device that memory estimates run on)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def demodulation_coefficients(weight: Tensor, styles: Tensor) -> Tensor:
    """1 / ||W_o * s_n|| for every sample n and output filter o: (N, out), always in fp32 (autocast
    off), whatever the weights' and styles' dtypes. ||W_o * s||^2 = sum_i s_i^2 sum_k W_oik^2 is one
    small matmul (N, in) x (in, out), not a (N, out, in, k, k) tensor of per-sample weights."""
    with autocast_off(styles.device.type):
        energy = weight.float().square().sum(dim=(2, 3))  # (out, in)
        return (styles.float().square() @ energy.t() + 1e-8).rsqrt()


def _conv_dtype(x: Tensor) -> torch.dtype:
    """The dtype a conv on `x` runs in: autocast's when it is on for x's device, else x's own."""
    device = x.device.type
    if x.is_floating_point() and torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _conv(x: Tensor, weight: Tensor, up: int, fir: Tensor | None, groups: int = 1) -> Tensor:
    """A 'same' conv, or (up=2) a stride-2 transposed conv followed by the [1,3,3,1] filter."""
    k = weight.shape[-1]
    if up == 1:
        return F.conv2d(x, weight, padding=k // 2, groups=groups)
    # Transposed conv weights are (in, out / groups, k, k) per group.
    cout = weight.shape[0] // groups
    w = weight.reshape(groups, cout, -1, k, k).transpose(1, 2).reshape(-1, cout, k, k)
    x = F.conv_transpose2d(x, w, stride=2, groups=groups)
    return blur(x, fir, pad=1, gain=4.0)  # (2H + 1) + 2 - 3 = 2H pixels (NVlabs' padding for k=3)


MBSTD_LAYOUTS = ("strided", "consecutive")


class MinibatchStd(nn.Module):
    """Appends one channel: the standard deviation of each feature over a group of samples,
    averaged over features and pixels. The group size is min(group_size, N), lowered to the largest
    divisor of N when N is not a multiple of it (e.g. N=3 with group 4 -> groups of 3; N=6 -> groups
    of 3; NVlabs asserts instead).

    `layout` says which samples share a group:
    - `strided` (NVlabs' `x.reshape(G, -1, ...)`): sample i with i + N/G, i + 2N/G, ...;
    - `consecutive`: runs of neighbours (0..G-1, G..2G-1, ...), so that 2 ranks x B form the same
      groups as 1 x 2B (what exact comparisons across process counts need).

    Inside `independent_sets(k)`, the batch is k equal-size sets concatenated
    (distgan's D runs reals and fakes in one forward, for one DDP/ZeRO reduction and one R1/R2
    double backward). Each set is then grouped on its own, in either layout, with
    min(group_size, N / k), exactly as if it went through D alone (NVlabs' separate forwards): a
    group never mixes reals and fakes, whatever the batch per rank."""

    def __init__(self, group_size: int = 4, layout: str = "strided"):
        super().__init__()
        if layout not in MBSTD_LAYOUTS:
            raise ValueError(f"MinibatchStd layout must be one of {MBSTD_LAYOUTS}, got {layout!r}")
        self.group_size, self.layout = group_size, layout

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        sets = layers.batch_sets()
        if n % sets:
            raise ValueError(f"MinibatchStd: a batch of {n} cannot be split into {sets} equal sets "
                             "(reals and fakes concatenated must have the same count)")
        per_set = n // sets
        g = min(self.group_size, per_set)
        while per_set % g:
            g -= 1
        # (sets, groups, members) or (sets, members, groups): the members' axis is reduced.
        member_dim = 1 if self.layout == "strided" else 2
        shape = (sets, g, per_set // g) if self.layout == "strided" else (sets, per_set // g, g)
        y = x.reshape(*shape, c, h, w)
        y = (y - y.mean(dim=member_dim, keepdim=True)).square().mean(dim=member_dim, keepdim=True)  # variance
        y = (y + 1e-8).sqrt().mean(dim=(3, 4, 5))  # one value per group, 1 on the members' axis
        y = y.expand(shape).reshape(n, 1, 1, 1).expand(n, 1, h, w)
        return torch.cat([x, y], dim=1)


__all__ = ["FullyConnected", "Conv", "MinibatchStd", "autocast_off", "modulated_conv2d",
           "demodulation_coefficients", "bias_act", "fir_filter", "blur", "upsample2d", "downsample2d", "LRELU_GAIN"]
