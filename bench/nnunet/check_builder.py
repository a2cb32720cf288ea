"""Check, inside nnU-Net's own environment, that nnU-Net builds and trains mslpipe's leaky_unet.

Run with nnU-Net's interpreter and the repository on PYTHONPATH (mslpipe is not installed there)::

    PYTHONPATH=. bench/nnunet/.venv/bin/python bench/nnunet/check_builder.py PLANS.json [--configuration 2d]

Uses nnU-Net's real code paths: ``PlansManager`` / ``ConfigurationManager`` on the plans,
``nnUNetTrainer.build_network_architecture`` (which calls ``get_network_from_plans``), the trainer's
``set_deep_supervision_enabled`` and ``_get_deep_supervision_scales``, its loss (``DC_and_CE_loss`` in a
``DeepSupervisionWrapper`` with nnU-Net's weights) on one batch with a backward pass, then builds the
network again as ``nnUNetv2_predict`` does (deep supervision off) and loads the trained weights into it.
Prints one JSON line and exits 0 when everything holds.
"""

from __future__ import annotations

import argparse
import json
import sys
import types

import numpy as np
import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plans")
    ap.add_argument("--configuration", default="2d")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    with open(args.plans) as f:
        plans = json.load(f)
    cm = PlansManager(plans).get_configuration(args.configuration)
    num_classes = 2  # background + lesion: nnU-Net's label manager gives 2 segmentation heads
    in_channels = 1
    device = torch.device(args.device)
    # the trainer's own builder (nnunetv2 >= 2.6 signature), which calls get_network_from_plans
    net = nnUNetTrainer.build_network_architecture(PlansManager(plans), cm, in_channels, num_classes, True).to(device)
    fake = types.SimpleNamespace(is_ddp=False, network=net, enable_deep_supervision=True, configuration_manager=cm)
    nnUNetTrainer.set_deep_supervision_enabled(fake, True)
    scales = nnUNetTrainer._get_deep_supervision_scales(fake)
    patch = [int(p) for p in cm.patch_size]
    x = torch.randn(args.batch, in_channels, *patch, device=device)
    outputs = net(x)
    assert isinstance(outputs, list | tuple), f"deep supervision on: expected a list, got {type(outputs)}"
    assert len(outputs) == len(scales), f"{len(outputs)} outputs for {len(scales)} deep-supervision scales"
    targets = []
    for out, scale in zip(outputs, scales, strict=True):
        want = [args.batch, num_classes, *(int(round(p * s)) for p, s in zip(patch, scale, strict=True))]
        assert list(out.shape) == want, f"output {list(out.shape)} != {want} at scale {scale}"
        targets.append(torch.randint(0, num_classes, (args.batch, 1, *want[2:]), device=device).float())
    weights = np.array([1 / (2**i) for i in range(len(scales))])
    weights[-1] = 0
    weights = weights / weights.sum()
    loss_fn = DeepSupervisionWrapper(
        DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                       weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss), weights)
    loss = loss_fn(outputs, targets)
    loss.backward()
    assert torch.isfinite(loss), "loss is not finite"
    nnUNetTrainer.set_deep_supervision_enabled(fake, False)
    net.eval()
    with torch.no_grad():
        single = net(x)
    assert torch.is_tensor(single) and list(single.shape) == [args.batch, num_classes, *patch], single.shape
    # nnUNetv2_predict builds the network with deep supervision off and loads the trained weights.
    inference_net = nnUNetTrainer.build_network_architecture(PlansManager(plans), cm, in_channels, num_classes, False)
    inference_net.load_state_dict(net.state_dict())
    report = {
        "ok": True, "class": f"{type(net).__module__}.{type(net).__qualname__}",
        "arch_kwargs": cm.network_arch_init_kwargs, "patch_size": patch, "deep_supervision_outputs":
        [list(o.shape) for o in outputs], "inference_output": list(single.shape), "loss": float(loss.detach()),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
