"""A PyTorch LPIPS written as the original (taming / lpips v0.1) with random weights, and the
file ``sdjax.tools.convert_lpips`` makes of it (used by test_lpips and test_train_autoencoder)."""

from pathlib import Path

import torch
from torch import nn as tnn

from sdjax.tools import convert_lpips


def torchvision_vgg16_features() -> tnn.Sequential:
    """torchvision's ``vgg16().features`` (config "D"), same indices."""
    layers, c_in = [], 3
    for v in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if v == "M":
            layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [tnn.Conv2d(c_in, v, kernel_size=3, padding=1), tnn.ReLU(inplace=True)]
            c_in = v
    return tnn.Sequential(*layers)


class NetLinLayer(tnn.Module):
    def __init__(self, chn_in):
        super().__init__()
        self.model = tnn.Sequential(tnn.Dropout(), tnn.Conv2d(chn_in, 1, 1, stride=1, padding=0, bias=False))

    def forward(self, x):
        return self.model(x)


class TorchLPIPS(tnn.Module):
    """taming.modules.losses.lpips.LPIPS: ScalingLayer, vgg16 slices, normalize_tensor, lins."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-.030, -.088, -.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([.458, .448, .450])[None, :, None, None])
        self.features = torchvision_vgg16_features()
        self.slices = [(0, 4), (4, 9), (9, 16), (16, 23), (23, 30)]
        self.lins = tnn.ModuleList([NetLinLayer(c) for c in (64, 128, 256, 512, 512)])

    def stages(self, x):
        outs = []
        for a, b in self.slices:
            for i in range(a, b):
                x = self.features[i](x)
            outs.append(x)
        return outs

    def forward(self, x0, x1):
        norm = lambda f: f / (torch.sqrt(torch.sum(f ** 2, dim=1, keepdim=True)) + 1e-10)
        f0s = self.stages((x0 - self.shift) / self.scale)
        f1s = self.stages((x1 - self.shift) / self.scale)
        val = 0
        for lin, f0, f1 in zip(self.lins, f0s, f1s):
            val = val + lin((norm(f0) - norm(f1)) ** 2).mean([2, 3], keepdim=True)
        return val


def write_reference(folder: Path) -> tuple[TorchLPIPS, str]:
    """A random TorchLPIPS (in eval mode) and the safetensors file convert_lpips writes from its
    torchvision-style VGG16 and lpips-style lin checkpoints in ``folder``."""
    torch.manual_seed(0)
    model = TorchLPIPS().eval()
    with torch.no_grad():
        for lin in model.lins:  # the learned heads are non-negative
            lin.model[1].weight.uniform_(0.0, 1.0)
    folder = Path(folder)
    vgg = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # a torchvision checkpoint carries the classifier too
    torch.save(vgg, folder / "vgg16.pth")
    torch.save({f"lin{k}.model.1.weight": lin.model[1].weight for k, lin in enumerate(model.lins)}, folder / "vgg.pth")
    out = folder / "lpips_vgg.safetensors"
    convert_lpips.main(["--vgg", str(folder / "vgg16.pth"), "--lin", str(folder / "vgg.pth"), "--out", str(out)])
    return model, str(out)
