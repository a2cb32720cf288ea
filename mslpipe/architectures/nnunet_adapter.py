"""``leaky_unet`` as nnU-Net v2 builds networks, so that nnU-Net itself can train the study's U-Net.

nnU-Net v2 (``nnunetv2.utilities.get_network_from_plans``) resolves the plans' ``network_class_name``
with ``pydoc.locate`` and calls::

    network_class(input_channels=C, num_classes=K, deep_supervision=bool, **arch_kwargs)

Its trainer then switches deep supervision on and off at run time with
``network.decoder.deep_supervision = flag`` and derives the deep-supervision scales from
``arch_kwargs["strides"]``. :class:`NnUNetLeakyUNet` is :class:`~mslpipe.architectures.leaky_unet.LeakyUNet`
with that interface:

* ``input_channels`` / ``num_classes`` instead of ``in_channels`` / ``out_channels``. nnU-Net trains
  ``num_classes=2`` (background and lesion, softmax); mslpipe trains one output with a sigmoid.
* ``strides``: accepted for nnU-Net's bookkeeping; it must be ``[[1, 1]] + [[2, 2]] * depth``.
* deep supervision: with ``decoder.deep_supervision`` true, ``forward`` returns a list of logits, full
  resolution first, then one per coarser decoder level (1/2, 1/4, ... 1/2**(depth-1)), from extra 1x1
  heads; like nnU-Net's own ``PlainConvUNet`` those heads always exist (so weights trained with deep
  supervision load into a network built without it) and are unused when it is off. With it off the
  output is the plain tensor and the network computes exactly what ``LeakyUNet`` computes.

This module needs torch only (no monai, nibabel or nnunetv2), so nnU-Net's environment can import it
with the repository on ``PYTHONPATH``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mslpipe.architectures.leaky_unet import LeakyUNet

__all__ = ["DeepSupervisionSwitch", "NnUNetLeakyUNet"]


class DeepSupervisionSwitch(nn.Module):
    """Holds the flag nnU-Net's trainer sets as ``network.decoder.deep_supervision`` (no parameters)."""

    def __init__(self, deep_supervision: bool = False):
        super().__init__()
        self.deep_supervision = bool(deep_supervision)

    def extra_repr(self) -> str:
        return f"deep_supervision={self.deep_supervision}"


class NnUNetLeakyUNet(LeakyUNet):
    """The study's U-Net with nnU-Net v2's constructor and deep-supervision interface."""

    def __init__(self, input_channels: int, num_classes: int, deep_supervision: bool = False,
                 strides: Any = None, **kwargs: Any):
        super().__init__(input_channels, num_classes, **kwargs)
        expected = [[1, 1]] + [[2, 2]] * self.depth
        if strides is not None and [list(map(int, s)) for s in strides] != expected:
            raise ValueError(f"leaky_unet pools 2x2 {self.depth} times: strides must be {expected}, got {strides}")
        self.decoder = DeepSupervisionSwitch(deep_supervision)
        # ds_heads[i] reads decoder level i + 1 (1/2**(i+1) resolution).
        self.ds_heads = nn.ModuleList(nn.Conv2d(self.widths[level], num_classes, 1)
                                      for level in range(1, self.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        levels = self.decode(x)  # deepest first: levels[i] is at 1/2**(depth-1-i) resolution
        out = self.head(levels[-1])
        if not self.decoder.deep_supervision:
            return out
        # nnU-Net wants full resolution first, then each coarser level.
        return [out, *(self.ds_heads[level - 1](levels[self.depth - 1 - level]) for level in range(1, self.depth))]
