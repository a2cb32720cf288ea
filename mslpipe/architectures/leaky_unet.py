"""``leaky_unet``: the original science-fair study's 2D U-Net, with its ablation knobs.

Full width (the default) it is the classic U-Net with batch norm and leaky ReLU:

* encoder: five "doubleConv" blocks of 64, 128, 256, 512 and 1024 channels, a 2x2 max-pool
  between consecutive levels; a doubleConv is ``(Conv2d 3x3, padding 1 -> BatchNorm2d ->
  LeakyReLU(0.01)) x 2``;
* decoder: bilinear x2 upsampling (``align_corners=False``, see below), concatenation
  ``[skip, upsampled]`` along channels, then a doubleConv: 1024+512 -> 512, 512+256 -> 256,
  256+128 -> 128, 128+64 -> 64;
* head: a 1x1 convolution to ``out_channels``; the network returns logits (no sigmoid/softmax).

Parameter count at ``in_channels=1, out_channels=1``: **31,389,569** (31.39 M). That number needs
the 3x3 convolutions to keep their bias (PyTorch's default, ``bias=True``) even though a batch norm
follows them; with ``bias=False`` the count is 31,383,681 (31.38 M). Batch-norm running statistics
are buffers, not parameters, and are not counted.

``align_corners=False``: PyTorch's default and the half-pixel-centre convention that Keras'
``UpSampling2D(interpolation="bilinear")`` also uses; as the input size is divisible by
``2**depth`` every upsampling doubles the size exactly, so the skip shapes always match.

Ablation knobs (keyword arguments of :func:`leaky_unet` / :class:`LeakyUNet`):

``activation``      ``"leakyrelu"`` (default, ``negative_slope`` 0.01), ``"relu"``, ``"sigmoid"``,
                    ``"tanh"`` — the activation inside every block (never on the output).
``norm_first``      ``True`` (default): conv -> norm -> act; ``False``: conv -> act -> norm.
``convs_per_block`` convolutions per block (default 2; the study used 2, 3 and 4).
``max_channels``    width cap (default 1024; 512 gives 64, 128, 256, 512, 512).
``base_channels``   first-level width (default 64); widths double per level up to the cap.
``depth``           number of poolings (default 4); input H and W must be divisible by ``2**depth``.
``dropout``         ``Dropout2d`` probability at the end of every block (default 0: no module at all).

A tiny configuration for tests and smoke runs: ``base_channels=8, depth=3`` (about 0.12 M params).

The model is channels_last- and ``torch.compile``-friendly: no ``.view``, no data-dependent Python
control flow (the input check in ``forward`` only looks at shapes).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

__all__ = ["ACTIVATIONS", "LeakyUNet", "check_input", "conv_block", "leaky_unet"]

#: The activations the ``activation`` knob accepts.
ACTIVATIONS = ("leakyrelu", "relu", "sigmoid", "tanh")


def check_input(x: torch.Tensor, divisor: int, arch: str) -> None:
    """Raise ValueError unless ``x`` is ``(N, C, H, W)`` with H and W divisible by ``divisor``.

    Looks at shapes only, so it stays inside one graph under ``torch.compile`` (at most a guard).
    """
    if x.dim() != 4:
        raise ValueError(f"{arch}: expected a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    height, width = x.shape[-2], x.shape[-1]
    if height % divisor != 0 or width % divisor != 0:
        raise ValueError(
            f"{arch}: input height and width must be divisible by {divisor}, got {height}x{width}; "
            f"pad or crop the slices to a multiple of {divisor}"
        )


def _int_arg(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _activation(name: str, negative_slope: float) -> nn.Module:
    if name == "leakyrelu":
        return nn.LeakyReLU(negative_slope)
    if name == "relu":
        return nn.ReLU()
    if name == "sigmoid":
        return nn.Sigmoid()
    if name == "tanh":
        return nn.Tanh()
    raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {name!r}")


def conv_block(
    in_channels: int,
    out_channels: int,
    *,
    convs: int = 2,
    activation: str = "leakyrelu",
    negative_slope: float = 0.01,
    norm_first: bool = True,
    dropout: float = 0.0,
) -> nn.Sequential:
    """The study's "doubleConv": ``convs`` x (Conv2d 3x3 -> BatchNorm2d -> activation), flat.

    With ``norm_first=False`` each unit is conv -> activation -> norm. Convolutions keep their bias
    (see the module docstring). ``dropout > 0`` appends a ``Dropout2d``.
    """
    layers: list[nn.Module] = []
    for i in range(convs):
        layers.append(nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1))
        norm, act = nn.BatchNorm2d(out_channels), _activation(activation, negative_slope)
        layers.extend((norm, act) if norm_first else (act, norm))
    if dropout > 0:
        layers.append(nn.Dropout2d(dropout))
    return nn.Sequential(*layers)


class LeakyUNet(nn.Module):
    """The study's U-Net; see the module docstring for the layout and the knobs."""

    arch_name = "leaky_unet"

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        activation: str = "leakyrelu",
        negative_slope: float = 0.01,
        norm_first: bool = True,
        convs_per_block: int = 2,
        max_channels: int = 1024,
        base_channels: int = 64,
        depth: int = 4,
        dropout: float = 0.0,
    ):
        super().__init__()
        in_channels = _int_arg("in_channels", in_channels, 1)
        out_channels = _int_arg("out_channels", out_channels, 1)
        convs_per_block = _int_arg("convs_per_block", convs_per_block, 1)
        max_channels = _int_arg("max_channels", max_channels, 1)
        base_channels = _int_arg("base_channels", base_channels, 1)
        depth = _int_arg("depth", depth, 1)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        if not isinstance(norm_first, bool):
            raise ValueError(f"norm_first must be true or false, got {norm_first!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if isinstance(negative_slope, bool) or not isinstance(negative_slope, int | float):
            raise ValueError(f"negative_slope must be a number, got {negative_slope!r}")

        self.widths = [min(base_channels * 2**level, max_channels) for level in range(depth + 1)]
        self.depth = depth
        self.required_divisor = 2**depth
        # batch norm + oneDNN convolutions: 1.57x faster forward and 1.29x faster training on a CPU in
        # channels_last than in the default layout (bench/RESULTS.md, "CPU memory layout")
        self.channels_last_on_cpu = True

        def block(cin: int, cout: int) -> nn.Sequential:
            return conv_block(
                cin,
                cout,
                convs=convs_per_block,
                activation=activation,
                negative_slope=negative_slope,
                norm_first=norm_first,
                dropout=float(dropout),
            )

        w = self.widths
        inputs = [in_channels, *w]  # level i takes inputs[i] channels and gives w[i]
        self.encoders = nn.ModuleList(block(inputs[i], w[i]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = block(w[-2], w[-1])
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        # Deepest first: decoders[0] takes the bottleneck's output.
        self.decoders = nn.ModuleList(block(w[i + 1] + w[i], w[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(w[0], out_channels, 1)

    def decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder, bottleneck and decoder; returns every decoder level's output, deepest first."""
        check_input(x, self.required_divisor, self.arch_name)
        skips: list[torch.Tensor] = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        levels: list[torch.Tensor] = []
        for i, decoder in enumerate(self.decoders):
            x = decoder(torch.cat([skips[-1 - i], self.up(x)], dim=1))
            levels.append(x)
        return levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(x)[-1])


def leaky_unet(in_channels: int, out_channels: int = 1, **kwargs) -> LeakyUNet:
    """The original study's U-Net (batch norm, leaky ReLU, bilinear upsampling), 31.39 M params."""
    return LeakyUNet(in_channels, out_channels, **kwargs)


# The registry checks option names against the factory's signature: show it the class's.
leaky_unet.__signature__ = inspect.signature(LeakyUNet)
