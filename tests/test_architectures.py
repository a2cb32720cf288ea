"""The architecture registry, the study's leaky_unet, nnunet2d and the entry-point plug-ins.

Everything runs at tiny widths on 32x32 inputs, except the full-width leaky_unet structure test,
which builds the 31.39 M-parameter network once and runs one 1x1x32x32 forward.
"""

from __future__ import annotations

import importlib.metadata
import logging

import pytest
import torch
from torch import nn

import mslpipe.architectures as arch
from mslpipe.architectures.leaky_unet import LeakyUNet
from mslpipe.errors import MslpipeError

TINY = {"base_channels": 8, "depth": 3}  # widths 8, 16, 32, 64; divisor 8
GROUP = arch.ENTRY_POINT_GROUP
LEAKY_UNET_PARAMS = 31_389_569
NNUNET2D_PARAMS = 33_460_289


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def blocks(model: LeakyUNet) -> list[nn.Sequential]:
    return [*model.encoders, model.bottleneck, *model.decoders]


def fake_factory(in_channels: int, out_channels: int = 1, *, width: int = 4) -> nn.Module:
    """A plug-in network for the entry-point tests."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.Conv2d(width, out_channels, 1))


NOT_CALLABLE = 42


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and OpenMP spin-waits cost seconds on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def registry_snapshot(monkeypatch):
    """Let a test register networks and load plug-ins into copies that are thrown away after it."""
    monkeypatch.setattr(arch, "_registry", dict(arch._registry))
    monkeypatch.setattr(arch, "_origin", dict(arch._origin))
    monkeypatch.setattr(arch, "_plugins_loaded", False)


@pytest.fixture
def entry_points(monkeypatch, registry_snapshot):
    """A list to fill with EntryPoints; importlib.metadata.entry_points returns it; counts calls."""
    fake: list[importlib.metadata.EntryPoint] = []
    calls: list[str] = []

    def fake_entry_points(*, group: str | None = None, **_: object):
        calls.append(str(group))
        return importlib.metadata.EntryPoints(ep for ep in fake if group is None or ep.group == group)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake_entry_points)
    fake_entry_points.eps = fake  # type: ignore[attr-defined]
    fake_entry_points.calls = calls  # type: ignore[attr-defined]
    return fake_entry_points


def ep(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=GROUP)


# --------------------------------------------------------------------------- registry


def test_builtins_are_available():
    names = arch.available()
    assert {"leaky_unet", "nnunet2d"} <= set(names)
    assert arch.DEFAULT_ARCHITECTURE == "leaky_unet"
    assert isinstance(arch.build("leaky_unet", **TINY), LeakyUNet)
    assert isinstance(arch.build("nnunet2d", **TINY), arch.NnUNet2D)


def test_unknown_name_lists_known_names():
    with pytest.raises(MslpipeError, match=r"unknown architecture 'resnet'.*leaky_unet.*nnunet2d"):
        arch.build("resnet")
    with pytest.raises(MslpipeError, match="unknown architecture"):
        arch.describe("resnet")
    with pytest.raises(MslpipeError, match="unknown architecture"):
        arch.required_divisor("resnet")


@pytest.mark.parametrize(
    ("name", "kwargs", "bad"),
    [
        ("leaky_unet", {"widht": 3}, "widht"),
        ("nnunet2d", {"activation": "relu"}, "activation"),
        ("leaky_unet", {"activation": "gelu"}, "activation"),
        ("leaky_unet", {"depth": 0}, "depth"),
        ("leaky_unet", {"convs_per_block": 0}, "convs_per_block"),
        ("leaky_unet", {"norm_first": "yes"}, "norm_first"),
        ("leaky_unet", {"dropout": 1.5}, "dropout"),
        ("leaky_unet", {"max_channels": 512.0}, "max_channels"),
        ("nnunet2d", {"depth": "6"}, "depth"),
        ("nnunet2d", {"base_channels": True}, "base_channels"),
    ],
)
def test_bad_kwargs_name_the_arch_and_the_kwarg(name, kwargs, bad):
    with pytest.raises(MslpipeError) as info:
        arch.build(name, **kwargs)
    assert repr(name) in str(info.value) and bad in str(info.value)
    with pytest.raises(MslpipeError, match=bad):
        arch.required_divisor(name, **kwargs)


def test_register_decorator(registry_snapshot):
    @arch.register("toy")
    def toy(in_channels: int, out_channels: int = 1, *, k: int = 1) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, k)

    assert arch.available()["toy"] is toy
    model = arch.build("toy", 3, 2, k=1)
    assert model.in_channels == 3 and model.out_channels == 2
    assert arch.describe("toy", 3)["parameters"] == 3 + 1
    assert arch.required_divisor("toy") == 1  # no required_divisor attribute: any size
    with pytest.raises(MslpipeError, match="already registered"):
        arch.register("toy")(toy)
    with pytest.raises(MslpipeError, match="already registered"):
        arch.register("leaky_unet")(toy)
    arch.register("toy", replace=True)(fake_factory)
    assert arch.available()["toy"] is fake_factory

    @arch.register("not_a_module")
    def bad(in_channels: int, out_channels: int = 1) -> object:
        return "oops"

    with pytest.raises(MslpipeError, match="not a Module"):
        arch.build("not_a_module")


# --------------------------------------------------------------------------- leaky_unet, full width


@pytest.fixture(scope="module")
def full_unet() -> LeakyUNet:
    torch.manual_seed(0)
    return arch.build("leaky_unet", 1)


def test_full_width_leaky_unet_structure(full_unet):
    model = full_unet
    assert model.widths == [64, 128, 256, 512, 1024]
    assert model.required_divisor == 16
    convs = [[m for m in block if isinstance(m, nn.Conv2d)] for block in blocks(model)]
    assert [(c[0].in_channels, c[0].out_channels) for c in convs] == [
        (1, 64), (64, 128), (128, 256), (256, 512), (512, 1024),  # encoders + bottleneck
        (1024 + 512, 512), (512 + 256, 256), (256 + 128, 128), (128 + 64, 64),  # decoders
    ]  # fmt: skip
    for block in blocks(model):
        assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU] * 2
        for conv in block[0::3]:
            assert conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.bias is not None
        assert block[0].out_channels == block[3].in_channels == block[3].out_channels
        assert all(act.negative_slope == 0.01 for act in block[2::3])
    assert isinstance(model.pool, nn.MaxPool2d) and model.pool.kernel_size == 2
    assert isinstance(model.up, nn.Upsample)
    assert model.up.mode == "bilinear" and model.up.scale_factor == 2.0 and model.up.align_corners is False
    assert (model.head.in_channels, model.head.out_channels, model.head.kernel_size) == (64, 1, (1, 1))
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {nn.Sigmoid, nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Tanh, nn.ReLU, nn.Dropout2d}


def test_full_width_leaky_unet_has_31_39_m_parameters(full_unet):
    n = n_params(full_unet)
    assert n == LEAKY_UNET_PARAMS
    assert round(n / 1e4) / 100 == 31.39
    # The detail that gives 31.39 M: the 3x3 convolutions keep their bias before batch norm.
    biases = sum(
        m.bias.numel() for m in full_unet.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)
    )
    assert round((n - biases) / 1e4) / 100 == 31.38


def test_full_width_forward_returns_logits_of_the_input_size(full_unet):
    full_unet.eval()
    with torch.no_grad():
        out = full_unet(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 1, 32, 32)
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------- leaky_unet knobs


@pytest.mark.parametrize(
    ("activation", "module"),
    [("leakyrelu", nn.LeakyReLU), ("relu", nn.ReLU), ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh)],
)
def test_activation_knob(activation, module):
    model = arch.build("leaky_unet", activation=activation, **TINY)
    acts = [m for m in model.modules() if isinstance(m, (nn.LeakyReLU, nn.ReLU, nn.Sigmoid, nn.Tanh))]
    assert acts and all(type(m) is module for m in acts)
    assert len(acts) == 2 * (2 * TINY["depth"] + 1)
    assert not isinstance(list(model.modules())[-1], module)  # the head stays linear: logits
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_norm_first_knob():
    after = arch.build("leaky_unet", norm_first=False, **TINY)
    for block in blocks(after):
        assert [type(m) for m in block] == [nn.Conv2d, nn.LeakyReLU, nn.BatchNorm2d] * 2
    before = arch.build("leaky_unet", norm_first=True, **TINY)
    assert [type(m) for m in before.bottleneck] == [nn.Conv2d, nn.BatchNorm2d, nn.LeakyReLU] * 2
    assert n_params(after) == n_params(before)


@pytest.mark.parametrize("convs", [2, 3, 4])
def test_convs_per_block_knob(convs):
    model = arch.build("leaky_unet", convs_per_block=convs, **TINY)
    for block in blocks(model):
        assert sum(isinstance(m, nn.Conv2d) for m in block) == convs
        assert sum(isinstance(m, nn.BatchNorm2d) for m in block) == convs
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    if convs > 2:
        fewer = arch.describe("leaky_unet", convs_per_block=convs - 1, **TINY)["parameters"]
        assert n_params(model) > fewer


def test_max_channels_knob_caps_the_widths():
    capped = arch.build("leaky_unet", max_channels=512, base_channels=64, depth=4, dropout=0.0)
    assert capped.widths == [64, 128, 256, 512, 512]
    assert capped.decoders[0][0].in_channels == 512 + 512
    full = arch.describe("leaky_unet")["parameters"]
    assert arch.describe("leaky_unet", max_channels=512)["parameters"] == n_params(capped) < full
    assert arch.build("leaky_unet", base_channels=8, depth=4, max_channels=32).widths == [8, 16, 32, 32, 32]


def test_base_channels_and_depth_knobs():
    model = arch.build("leaky_unet", base_channels=4, depth=2)
    assert model.widths == [4, 8, 16]
    assert len(model.encoders) == len(model.decoders) == 2
    assert model.required_divisor == 4
    assert model(torch.randn(1, 1, 12, 20)).shape == (1, 1, 12, 20)


def test_dropout_knob():
    assert not any(isinstance(m, nn.Dropout2d) for m in arch.build("leaky_unet", **TINY).modules())
    model = arch.build("leaky_unet", dropout=0.2, **TINY)
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout2d)]
    assert len(drops) == 2 * TINY["depth"] + 1 and all(d.p == 0.2 for d in drops)


# --------------------------------------------------------------------------- both networks


@pytest.mark.parametrize("name", ["leaky_unet", "nnunet2d"])
@pytest.mark.parametrize(("in_channels", "out_channels"), [(1, 1), (2, 3)])
def test_output_has_the_input_spatial_shape(name, in_channels, out_channels):
    torch.manual_seed(0)
    model = arch.build(name, in_channels, out_channels, **TINY)
    x = torch.randn(2, in_channels, 32, 48)
    out = model(x)
    assert out.shape == (2, out_channels, 32, 48)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", ["leaky_unet", "nnunet2d"])
def test_channels_last_gives_the_same_output(name):
    torch.manual_seed(0)
    model = arch.build(name, **TINY).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = model(x)
        got = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_required_divisor():
    assert arch.required_divisor("leaky_unet") == 16
    assert arch.required_divisor("leaky_unet", depth=3) == 8
    assert arch.required_divisor("leaky_unet", depth=5, base_channels=8) == 32
    assert arch.required_divisor("nnunet2d") == 64
    assert arch.required_divisor("nnunet2d", depth=3) == 8
    assert arch.required_divisor("nnunet2d", in_channels=2, out_channels=3, depth=4) == 16
    for name in ("leaky_unet", "nnunet2d"):
        assert arch.build(name, **TINY).required_divisor == arch.required_divisor(name, **TINY)


@pytest.mark.parametrize("name", ["leaky_unet", "nnunet2d"])
def test_indivisible_or_malformed_input_raises_a_clear_value_error(name):
    model = arch.build(name, **TINY)
    with pytest.raises(ValueError, match=f"{name}: input height and width must be divisible by 8, got 30x32"):
        model(torch.randn(1, 1, 30, 32))
    with pytest.raises(ValueError, match="divisible by 8, got 32x36"):
        model(torch.randn(1, 1, 32, 36))
    with pytest.raises(ValueError, match=r"expected a 4-D input \(N, C, H, W\)"):
        model(torch.randn(1, 32, 32))


def test_leaky_unet_compiles_into_one_graph():
    model = arch.build("leaky_unet", base_channels=4, depth=2).eval()
    x = torch.randn(1, 1, 16, 16)
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # fullgraph: a break would raise
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_nnunet2d_defaults():
    model = arch.build("nnunet2d")
    assert model.widths == [32, 64, 128, 256, 512, 512, 512]
    assert n_params(model) == NNUNET2D_PARAMS
    kinds = {type(m) for m in model.modules()}
    assert {nn.InstanceNorm2d, nn.LeakyReLU, nn.ConvTranspose2d} <= kinds
    assert nn.BatchNorm2d not in kinds and nn.MaxPool2d not in kinds
    norms = [m for m in model.modules() if isinstance(m, nn.InstanceNorm2d)]
    assert all(m.affine for m in norms)
    assert all(m.negative_slope == 0.01 for m in model.modules() if isinstance(m, nn.LeakyReLU))
    strided = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == 6  # strided-conv downsampling, one per level
    assert not model.net.deep_supervision
    head = model.net.output_block.conv.conv
    assert (head.in_channels, head.out_channels, head.kernel_size) == (32, 1, (1, 1))


# --------------------------------------------------------------------------- describe


def test_describe_counts_parameters():
    info = arch.describe("leaky_unet")
    assert info["parameters"] == info["trainable_parameters"] == LEAKY_UNET_PARAMS
    assert info["required_divisor"] == 16 and info["source"] == "builtin"
    assert info["class"] == "mslpipe.architectures.leaky_unet.LeakyUNet"
    assert info["summary"] and info["kwargs"] == {}
    assert arch.describe("nnunet2d")["parameters"] == NNUNET2D_PARAMS
    tiny = arch.describe("leaky_unet", 2, out_channels=3, **TINY)
    assert tiny["parameters"] == n_params(arch.build("leaky_unet", 2, 3, **TINY))
    assert (tiny["in_channels"], tiny["out_channels"], tiny["kwargs"]) == (2, 3, TINY)
    # one more input channel adds 9 weights per first-level filter
    assert arch.describe("leaky_unet", 2)["parameters"] - LEAKY_UNET_PARAMS == 9 * 64


# --------------------------------------------------------------------------- entry points


def test_entry_point_plugin_is_registered_lazily_once(entry_points):
    entry_points.eps.append(ep("fake_net", f"{__name__}:fake_factory"))
    names = arch.available()
    assert names["fake_net"] is fake_factory
    assert {"leaky_unet", "nnunet2d"} <= set(names)
    model = arch.build("fake_net", 2, 3, width=5)
    assert model(torch.randn(1, 2, 7, 9)).shape == (1, 3, 7, 9)
    info = arch.describe("fake_net", 2, width=5)
    assert info["source"] == f"entry point {__name__}:fake_factory"
    assert info["parameters"] == n_params(fake_factory(2, 1, width=5))
    with pytest.raises(MslpipeError, match="'fake_net' has no option 'depth'"):
        arch.build("fake_net", depth=3)
    arch.available()
    arch.build("leaky_unet", **TINY)
    assert entry_points.calls == [GROUP]  # looked up once, for our group only
    assert arch.load_plugins() == []
    entry_points.eps.clear()
    assert arch.load_plugins(force=True) == []
    assert "fake_net" not in arch.available()


def test_broken_entry_points_are_skipped_with_a_warning(entry_points, tmp_path, monkeypatch, caplog):
    (tmp_path / "explodes_on_import.py").write_text("raise RuntimeError('plugin is broken')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry_points.eps.extend(
        [
            ep("missing", "no_such_package_xyz.nets:factory"),
            ep("explodes", "explodes_on_import:factory"),
            ep("not_callable", f"{__name__}:NOT_CALLABLE"),
            ep("no_attr", f"{__name__}:no_such_factory"),
            ep("leaky_unet", f"{__name__}:fake_factory"),  # may not shadow a built-in
            ep("good", f"{__name__}:fake_factory"),
        ]
    )
    with caplog.at_level(logging.WARNING, logger="mslpipe.architectures"):
        names = arch.available()
    assert {"leaky_unet", "nnunet2d", "good"} <= set(names)
    assert not {"missing", "explodes", "not_callable", "no_attr"} & set(names)
    assert names["leaky_unet"] is not fake_factory
    assert isinstance(arch.build("leaky_unet", **TINY), LeakyUNet)
    assert isinstance(arch.build("nnunet2d", **TINY), arch.NnUNet2D)
    text = caplog.text
    for name in ("missing", "explodes", "not_callable", "no_attr", "leaky_unet"):
        assert f"skipping architecture entry point {name} =" in text
    assert "plugin is broken" in text and "already taken" in text and "not callable" in text
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 5


def test_failing_entry_point_listing_does_not_break_builtins(monkeypatch, registry_snapshot, caplog):
    def boom(**_: object):
        raise OSError("corrupt metadata")

    monkeypatch.setattr(importlib.metadata, "entry_points", boom)
    with caplog.at_level(logging.WARNING, logger="mslpipe.architectures"):
        assert isinstance(arch.build("leaky_unet", **TINY), LeakyUNet)
    assert "corrupt metadata" in caplog.text


def test_nnunet2d_depth_is_fitted_to_the_slices_it_will_see():
    """nnU-Net's planner's rule: the most downsamplings (at most 6) that leave the deepest stage 4 pixels or more per
    side; a depth the caller names is kept, and networks without the hook get their options back unchanged."""
    assert arch.fit_to_patch("nnunet2d", [64, 72], base_channels=16) == {"base_channels": 16, "depth": 4}
    assert arch.fit_to_patch("nnunet2d", [150, 181])["depth"] == 5  # an MNI brain at 1 mm
    assert arch.fit_to_patch("nnunet2d", [400, 512])["depth"] == 6
    assert arch.fit_to_patch("nnunet2d", [5, 300])["depth"] == 1
    assert arch.fit_to_patch("nnunet2d", [64, 64], depth=2) == {"depth": 2}
    assert arch.fit_to_patch("leaky_unet", [40, 40], base_channels=8) == {"base_channels": 8}
    for sizes in ([61, 70], [150, 181], [33, 40]):
        depth = arch.fit_to_patch("nnunet2d", sizes)["depth"]
        patch = [-(-s // 2**depth) * 2**depth for s in sizes]
        assert min(patch) // 2**depth >= 4  # the deepest stage of the rounded patch
        assert depth == 6 or -(-min(sizes) // 2**(depth + 1)) < 4  # and one more would leave it under 4


def test_nnunet2d_trains_on_a_small_patch_at_its_fitted_depth():
    """A 64-pixel patch at the default depth 6 leaves 1x1 at the bottom, where instance norm cannot train (the
    failure `train --arch nnunet2d` met on the synthetic data); at the fitted depth a training step runs."""
    x = torch.randn(2, 1, 64, 64)
    too_deep = arch.build("nnunet2d", base_channels=4, max_channels=16).train()
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        too_deep(x)
    model = arch.build("nnunet2d", **arch.fit_to_patch("nnunet2d", [64, 64], base_channels=4, max_channels=16))
    model.train()(x).mean().backward()


def test_cpu_plans_shrink_the_built_in_networks_and_leave_others_alone():
    assert arch.cpu_kwargs("leaky_unet") == {"base_channels": 16, "max_channels": 256}
    assert arch.cpu_kwargs("nnunet2d") == {"base_channels": 16}

    @arch.register("plain_test_net")
    def plain(in_channels, out_channels=1):
        return torch.nn.Conv2d(in_channels, out_channels, 1)

    try:
        assert arch.cpu_kwargs("plain_test_net") == {}  # a plugged-in network without the attribute gets no options
    finally:
        arch._registry.pop("plain_test_net"), arch._origin.pop("plain_test_net")
