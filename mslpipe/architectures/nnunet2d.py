"""``nnunet2d``: nnU-Net's default 2D network, for comparison with ``leaky_unet``.

A plain convolutional U-Net built with MONAI's ``DynUNet``: every stage is two
(Conv2d 3x3 -> InstanceNorm2d(affine=True) -> LeakyReLU(0.01)) units, the first convolution of
stages 1..depth has stride 2 (strided-conv downsampling), the decoder upsamples with 2x2 transposed
convolutions, and a 1x1 convolution gives ``out_channels`` logits. Widths are ``base_channels * 2**i``
capped at ``max_channels``: 32, 64, 128, 256, 512, 512, 512 at the defaults.

Keyword arguments: ``depth`` (number of downsamplings, default 6; input H and W must be divisible
by ``2**depth``, so a 224x192 patch needs ``depth=5`` or padding to 256x192; plans choose it by
nnU-Net's planner's rule, :func:`fit_to_patch`), ``base_channels``
(default 32), ``max_channels`` (default 512). Deep supervision is off and there are no residual
blocks. In training mode instance norm needs more than one pixel per channel, so the deepest stage
must be at least 2x2: H and W at least ``2 * 2**depth``.

Parameter count at ``in_channels=1, out_channels=1`` and the defaults: **33,460,289**. MONAI leaves
the bias out of the 3x3 and the transposed convolutions (an instance norm follows each of them and
cancels a per-channel bias); with those biases it would be 33,468,833. nnU-Net's own
``PlainConvUNet`` keeps them, and also holds (unused without deep supervision) 1x1 heads for the
coarser decoder stages, so its count is a little higher again.

``monai`` is imported when the network is built, not when this module is imported.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mslpipe.architectures.leaky_unet import check_input

__all__ = ["NnUNet2D", "fit_to_patch", "nnunet2d", "nnunet2d_widths"]

MAX_DEPTH = 6
MIN_DEEPEST_SIDE = 4  # nnU-Net v2 planner: UNet_featuremap_min_edge_length


def _int_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def nnunet2d_widths(depth: int = 6, base_channels: int = 32, max_channels: int = 512) -> list[int]:
    """Channel width of each of the ``depth + 1`` stages."""
    return [min(base_channels * 2**stage, max_channels) for stage in range(depth + 1)]


class NnUNet2D(nn.Module):
    """A MONAI ``DynUNet`` (in ``self.net``) behind an input-shape check."""

    arch_name = "nnunet2d"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        depth: int = 6,
        base_channels: int = 32,
        max_channels: int = 512,
    ):
        super().__init__()
        in_channels = _int_arg("in_channels", in_channels, 1)
        out_channels = _int_arg("out_channels", out_channels, 1)
        depth = _int_arg("depth", depth, 1)
        base_channels = _int_arg("base_channels", base_channels, 1)
        max_channels = _int_arg("max_channels", max_channels, 1)

        from monai.networks.nets import DynUNet  # lazy: monai is slow to import

        self.widths = nnunet2d_widths(depth, base_channels, max_channels)
        self.depth = depth
        self.required_divisor = 2**depth
        # instance norm is slower in channels_last on a CPU (bench/RESULTS.md, "CPU memory layout")
        self.channels_last_on_cpu = False
        strides = [1] + [2] * depth
        self.net = DynUNet(
            spatial_dims=2,
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_size=[3] * (depth + 1),
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=self.widths,
            norm_name=("INSTANCE", {"affine": True}),
            act_name=("leakyrelu", {"negative_slope": 0.01}),
            deep_supervision=False,
            res_block=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.required_divisor, self.arch_name)
        return self.net(x)


def nnunet2d(
    in_channels: int,
    out_channels: int = 1,
    *,
    depth: int = 6,
    base_channels: int = 32,
    max_channels: int = 512,
) -> NnUNet2D:
    """nnU-Net's default 2D plain-conv U-Net (instance norm, strided convs), via MONAI DynUNet."""
    return NnUNet2D(
        in_channels, out_channels, depth=depth, base_channels=base_channels, max_channels=max_channels
    )


def fit_to_patch(sizes: list[float], kwargs: dict) -> dict:
    """``kwargs`` with the ``depth`` for slices of ``sizes`` pixels (before the patch is rounded up to ``2**depth``):
    the most downsamplings, at most 6, that leave the deepest stage at least 4 pixels per side, as nnU-Net's planner
    does. At 64 pixels that is 4, at 150-180 (an MNI brain at 1 mm) 5. A depth already in ``kwargs`` is kept."""
    if "depth" in kwargs:
        return dict(kwargs)
    smallest = min(float(s) for s in sizes)
    depth = next((d for d in range(MAX_DEPTH, 0, -1) if math.ceil(smallest / 2**d) >= MIN_DEEPEST_SIDE), 1)
    return {**kwargs, "depth": depth}


nnunet2d.fit_to_patch = fit_to_patch  # the registry's hook: see architectures.fit_to_patch
