"""The registry of segmentation networks: built-in ones and those other packages plug in.

A *factory* builds a network::

    factory(in_channels: int, out_channels: int = 1, **kwargs) -> torch.nn.Module

and returns logits of shape ``(N, out_channels, H, W)`` for an input ``(N, in_channels, H, W)``.
A network may set an integer attribute ``required_divisor``: input H and W must be divisible by
it (:func:`required_divisor` reports 1 for networks that do not set it). It may set
``channels_last_on_cpu = True`` when it runs faster in that memory layout on a CPU (on CUDA every
network runs channels_last; see :func:`memory_format`). A factory may carry a function attribute
``fit_to_patch(sizes, kwargs) -> kwargs`` that adapts its options to the slices it will see (``nnunet2d``
chooses its depth so); :func:`fit_to_patch` calls it, and plans record what it returns. A ``cpu_kwargs`` dict
attribute holds the options a CPU plan shrinks it with (:func:`cpu_kwargs`).

Built in: ``leaky_unet`` (the default, the original study's U-Net, 31.39 M parameters) and
``nnunet2d`` (nnU-Net's default 2D U-Net through MONAI's DynUNet).

API::

    register(name, *, replace=False)              # decorator for a factory
    build(name, in_channels=1, out_channels=1, **kwargs) -> nn.Module
    available() -> dict[str, factory]             # built-ins, registered and plugged-in ones
    describe(name, in_channels=1, **kwargs) -> dict   # includes "parameters"
    required_divisor(name, **kwargs) -> int
    fit_to_patch(name, sizes, **kwargs) -> dict   # options adapted to slices of ``sizes`` pixels
    cpu_kwargs(name) -> dict                      # options that shrink it for a CPU plan
    memory_format(model, device) -> torch.memory_format   # the layout a built network runs in
    load_plugins(force=False) -> list[str]        # normally called for you, lazily

Plugging in a network from another package
------------------------------------------
Declare the factory under the entry-point group ``mslpipe.architectures`` in that package's
``pyproject.toml`` and install it next to mslpipe::

    [project.entry-points."mslpipe.architectures"]
    my_unet = "my_package.networks:my_unet"

The entry points are looked up once, the first time the registry is asked for anything. The entry
point's name becomes the architecture name (``architecture: "my_unet"`` in the plans). An entry
point that fails to load, does not load a callable, or reuses a name already taken is skipped with
a warning in the log; it never breaks the built-in networks.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mslpipe.architectures.leaky_unet import LeakyUNet, leaky_unet
from mslpipe.architectures.nnunet2d import NnUNet2D, nnunet2d
from mslpipe.errors import MslpipeError

__all__ = [
    "ENTRY_POINT_GROUP",
    "DEFAULT_ARCHITECTURE",
    "Factory",
    "LeakyUNet",
    "NnUNet2D",
    "available",
    "build",
    "check_name",
    "cpu_kwargs",
    "describe",
    "load_plugins",
    "register",
    "required_divisor",
    "fit_to_patch",
    "memory_format",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mslpipe.architectures"
DEFAULT_ARCHITECTURE = "leaky_unet"

Factory = Callable[..., nn.Module]

_registry: dict[str, Factory] = {}
_origin: dict[str, str] = {}  # name -> "builtin" | "registered" | "entry point <value>"
_plugins_loaded = False


def register(name: str, *, replace: bool = False) -> Callable[[Factory], Factory]:
    """Decorator: add ``factory`` to the registry under ``name`` and return it unchanged.

    A name already taken raises :class:`MslpipeError` unless ``replace=True``.
    """
    if not isinstance(name, str) or not name:
        raise MslpipeError(f"an architecture name must be a non-empty string, got {name!r}")

    def decorator(factory: Factory) -> Factory:
        if not callable(factory):
            raise MslpipeError(f"architecture {name!r}: the factory must be callable, got {factory!r}")
        if name in _registry and not replace:
            raise MslpipeError(f"architecture {name!r} is already registered ({_origin[name]})")
        _registry[name] = factory
        _origin[name] = "registered"
        return factory

    return decorator


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed entry points of the ``mslpipe.architectures`` group."""
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def load_plugins(force: bool = False) -> list[str]:
    """Register the factories of the ``mslpipe.architectures`` entry points; return the new names.

    Runs once (later calls return ``[]``) unless ``force=True``, which first forgets the networks
    that earlier calls plugged in. Broken entry points are logged and skipped.
    """
    global _plugins_loaded
    if _plugins_loaded and not force:
        return []
    _plugins_loaded = True
    if force:
        for name in [n for n, origin in _origin.items() if origin.startswith("entry point")]:
            del _registry[name], _origin[name]
    try:
        entry_points = _entry_points()
    except Exception as exc:  # a corrupt installed distribution must not break the built-ins
        log.warning("could not list the %r entry points: %s", ENTRY_POINT_GROUP, exc)
        return []
    added: list[str] = []
    for ep in entry_points:
        if ep.name in _registry:
            log.warning(
                "skipping architecture entry point %s = %s: the name is already taken (%s)",
                ep.name,
                ep.value,
                _origin[ep.name],
            )
            continue
        try:
            factory = ep.load()
        except Exception as exc:  # any import-time error in a third-party package
            log.warning(
                "skipping architecture entry point %s = %s: %s: %s",
                ep.name,
                ep.value,
                type(exc).__name__,
                exc,
            )
            continue
        if not callable(factory):
            log.warning("skipping architecture entry point %s = %s: it is not callable", ep.name, ep.value)
            continue
        _registry[ep.name] = factory
        _origin[ep.name] = f"entry point {ep.value}"
        added.append(ep.name)
        log.debug("registered architecture %r from entry point %s", ep.name, ep.value)
    return added


def available() -> dict[str, Factory]:
    """All known factories by name (a copy), sorted by name; loads the plugins on first use."""
    load_plugins()
    return dict(sorted(_registry.items()))


def _factory(name: str) -> Factory:
    load_plugins()
    if name not in _registry:
        raise MslpipeError(f"unknown architecture {name!r}; known: {', '.join(sorted(_registry))}")
    return _registry[name]


def check_name(name: str) -> None:
    """Raise :class:`MslpipeError` naming the known architectures when ``name`` is not one of them."""
    _factory(name)


def _check_kwargs(name: str, factory: Factory, kwargs: dict[str, Any]) -> None:
    """Raise MslpipeError naming the first keyword ``factory`` does not accept."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # no introspectable signature: leave it to the call
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {n for n, p in params.items() if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    for key in kwargs:
        if key not in accepted:
            known = sorted(accepted - {"in_channels", "out_channels"})
            raise MslpipeError(
                f"architecture {name!r} has no option {key!r}; its options: {', '.join(known) or 'none'}"
            )


def build(name: str, in_channels: int = 1, out_channels: int = 1, **kwargs: Any) -> nn.Module:
    """Build the network ``name``; unknown names and bad options raise :class:`MslpipeError`."""
    factory = _factory(name)
    _check_kwargs(name, factory, kwargs)
    try:
        model = factory(in_channels, out_channels, **kwargs)
    except (TypeError, ValueError) as exc:
        raise MslpipeError(f"architecture {name!r}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise MslpipeError(
            f"architecture {name!r}: the factory returned {type(model).__name__}, not a Module"
        )
    return model


def _build_cheaply(name: str, in_channels: int, out_channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """Build on the meta device (no memory, no weight init); fall back to the CPU if that fails.

    Unknown names and options raise before anything is built; any other failure on the meta device
    (say a third-party factory that needs real tensors) is retried on the CPU, which raises the
    real error if there is one.
    """
    _check_kwargs(name, _factory(name), kwargs)
    try:
        with torch.device("meta"):
            return build(name, in_channels, out_channels, **kwargs)
    except Exception as exc:
        log.debug("building %r on the meta device failed (%s); building on the CPU", name, exc)
    return build(name, in_channels, out_channels, **kwargs)


def describe(name: str, in_channels: int = 1, **kwargs: Any) -> dict[str, Any]:
    """A summary of the network ``name`` built with these options (``out_channels`` may be among them).

    Keys: name, class, summary (the factory's first docstring line), source ("builtin",
    "registered" or "entry point <module:attr>"), in_channels, out_channels, kwargs, parameters,
    trainable_parameters, required_divisor. The network is built on the meta device, so this is
    cheap even for large networks.
    """
    out_channels = kwargs.pop("out_channels", 1)
    factory = _factory(name)
    model = _build_cheaply(name, in_channels, out_channels, kwargs)
    doc = inspect.getdoc(factory) or ""
    return {
        "name": name,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "summary": doc.splitlines()[0] if doc else "",
        "source": _origin[name],
        "in_channels": in_channels,
        "out_channels": out_channels,
        "kwargs": dict(kwargs),
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "required_divisor": int(getattr(model, "required_divisor", 1)),
    }


def required_divisor(name: str, **kwargs: Any) -> int:
    """What input H and W of ``name`` built with these options must be divisible by (e.g. 2**depth)."""
    in_channels = kwargs.pop("in_channels", 1)
    out_channels = kwargs.pop("out_channels", 1)
    model = _build_cheaply(name, in_channels, out_channels, kwargs)
    return int(getattr(model, "required_divisor", 1))


def cpu_kwargs(name: str) -> dict[str, Any]:
    """The options that shrink ``name`` for a CPU plan (the factory's ``cpu_kwargs`` attribute; none for a network
    that does not say): a full-width network trains too slowly on a few cores."""
    return dict(getattr(_factory(name), "cpu_kwargs", {}))


def fit_to_patch(name: str, sizes: list[float], **kwargs: Any) -> dict[str, Any]:
    """The options of ``name`` adapted to slices of ``sizes`` pixels (height, width) by the factory's own
    ``fit_to_patch`` hook, or ``kwargs`` unchanged when it has none."""
    hook = getattr(_factory(name), "fit_to_patch", None)
    return dict(hook(list(sizes), dict(kwargs))) if callable(hook) else dict(kwargs)


def memory_format(model: nn.Module, device: str) -> torch.memory_format:
    """channels_last on CUDA, and on a CPU for networks that say they are faster in it
    (``channels_last_on_cpu``; a compiled network answers for the one it wraps); else the default layout."""
    inner = getattr(model, "_orig_mod", model)
    if device == "cuda" or getattr(inner, "channels_last_on_cpu", False):
        return torch.channels_last
    return torch.contiguous_format


# CPU plans: the study's network at a quarter of its width, 16-256 channels (3 slices/s at full width on 2 cores,
# see the README's environment notes), and nnU-Net's at half of its own
leaky_unet.cpu_kwargs = {"base_channels": 16, "max_channels": 256}
nnunet2d.cpu_kwargs = {"base_channels": 16}
for _name, _builtin in (("leaky_unet", leaky_unet), ("nnunet2d", nnunet2d)):
    register(_name)(_builtin)
    _origin[_name] = "builtin"
del _name, _builtin
