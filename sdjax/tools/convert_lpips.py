"""Write the LPIPS weights file that ``sdjax.checkpoints.load.load_lpips`` reads.

    python -m sdjax.tools.convert_lpips --vgg vgg16-397923af.pth --lin vgg.pth --out lpips_vgg.safetensors

``--vgg``: torchvision's ImageNet VGG16 state dict (``features.*`` is kept, the classifier
dropped). ``--lin``: the LPIPS v0.1 linear heads (``lpips/weights/v0.1/vgg.pth`` of the
``lpips`` package, the same file taming-transformers downloads as ``vgg_lpips``), keys
``lin{k}.model.1.weight``. Needs torch, only to read the two pickles.
"""

import argparse
import re
from typing import Mapping

import numpy as np

from sdjax.models.lpips import LPIPS_KEYS

_LIN = re.compile(r"^lin(\d)\.(?:model\.1\.)?weight$")


def lpips_state_dict(vgg: Mapping[str, np.ndarray], lin: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Merge the VGG16 features and the LPIPS heads into the file's layout (f32, PyTorch shapes)."""
    out = {k: v for k, v in vgg.items() if k.startswith("features.")}
    for k, v in lin.items():
        m = _LIN.match(k)
        if m is None:
            raise ValueError(f"--lin: unexpected key {k!r}; expected lin0..lin4 weights of the LPIPS vgg.pth.")
        out[f"lin{m.group(1)}.weight"] = v
    missing = sorted(set(LPIPS_KEYS) - set(out))
    unexpected = sorted(set(out) - set(LPIPS_KEYS))
    if missing or unexpected:
        raise ValueError(f"LPIPS weights: missing {missing}, unexpected {unexpected}; give torchvision's VGG16 "
                         "state dict as --vgg and the LPIPS vgg.pth as --lin.")
    return {k: np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in out.items()}


def _load_pth(path: str) -> dict[str, np.ndarray]:
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in state:
        state = state["state_dict"]
    return {k: v.detach().float().numpy() for k, v in state.items()}


def main(argv: list[str] | None = None) -> None:
    from safetensors.numpy import save_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vgg", required=True, help="torchvision VGG16 state dict (.pth)")
    parser.add_argument("--lin", required=True, help="LPIPS v0.1 vgg.pth (linear heads)")
    parser.add_argument("--out", required=True, help="output .safetensors")
    args = parser.parse_args(argv)
    save_file(lpips_state_dict(_load_pth(args.vgg), _load_pth(args.lin)), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
