"""pytorch-fid, the FID reference, run in a process of its own (``tests/test_fid.py`` starts it).

pytorch-fid and torchvision live in ``$VENV/eval-reference`` (``./run setup test``), not in the
environment: the registry's torchvision wheel is built for CUDA torch, so its C++ ops do not load
next to the CPU torch, and an importable torchvision breaks diffusers' pipelines. The Inception
uses none of those ops, so torchvision's Python modules are imported without its package
initialiser (which registers the ops).

    python tests/eval_reference.py weights SEED OUT          # OUT.safetensors and OUT.pth, random weights
    python tests/eval_reference.py features WEIGHTS IMAGES.npy OUT.npy
    python tests/eval_reference.py stats WEIGHTS FOLDER OUT.npz
    python tests/eval_reference.py frechet A.npz B.npz                # prints the distance
    python tests/eval_reference.py clip CONFIG.json SEED OUT IMAGES_DIR CAPTIONS.txt
        # a random open_clip model (OUT.safetensors, OUT.bin), its token ids of the captions and the
        # cosine of each (image, caption) pair through open_clip's evaluation transform (OUT.npz)
    python tests/eval_reference.py clip-model CONFIG.json SEED OUT  # a random open_clip model: OUT.safetensors, OUT.bin
    python tests/eval_reference.py clip-cosines CONFIG.json WEIGHTS.safetensors IMAGES.npy CAPTIONS.txt OUT.npy
        # float images in [0, 1] as MLPerf scores them: to uint8 by truncation, then open_clip's transform

Several commands run in one process when joined by ``+``.
"""

import importlib.util
import os
import sys
import types

REFERENCE_DIR = os.path.join(sys.prefix, "eval-reference")


def _import_references():
    if not os.path.isdir(REFERENCE_DIR):
        raise SystemExit(f"{REFERENCE_DIR} is missing: run ./run setup test (it installs pytorch-fid there).")
    import transformers  # noqa: F401 - first, while torchvision is out of sight (open_clip imports it)

    sys.path.insert(0, REFERENCE_DIR)
    spec = importlib.util.find_spec("torchvision")
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__version__ = "0.28.0"
    sys.modules["torchvision"] = package
    from pytorch_fid import fid_score, inception

    return fid_score, inception


def _random_state_dict(seed: int):
    """torchvision's Inception3 tensors (those pytorch-fid's ``fid_inception_v3`` loads) with
    He-scaled convs and random BatchNorm statistics and affine terms."""
    import torch
    import torchvision.models.inception as tv

    torch.manual_seed(seed)
    net = tv.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=(2 / m.weight[0].numel()) ** 0.5)
        elif isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return net.state_dict()


def _model(inception, weights: str):
    """pytorch-fid's ``InceptionV3([3])`` with ``weights`` where it would download its own."""
    from safetensors.torch import load_file

    state = load_file(weights)
    inception.load_state_dict_from_url = lambda *a, **k: state
    return inception.InceptionV3([3]).eval()


def main(argv: list[str]) -> None:
    fid_score, inception = _import_references()
    commands = [[]]
    for a in argv:
        if a == "+":
            commands.append([])
        else:
            commands[-1].append(a)
    for command in commands:
        run(fid_score, inception, *command)


def run(fid_score, inception, command: str, *args: str) -> None:
    import numpy as np
    import torch

    if command == "weights":
        from safetensors.torch import save_file

        state = _random_state_dict(int(args[0]))
        save_file({k: v.contiguous() for k, v in state.items()}, args[1] + ".safetensors")
        torch.save(state, args[1] + ".pth")
    elif command == "features":
        model = _model(inception, args[0])
        images = torch.from_numpy(np.load(args[1])).permute(0, 3, 1, 2)
        with torch.no_grad():
            np.save(args[2], model(images)[0][:, :, 0, 0].numpy())
    elif command == "stats":  # pytorch-fid's --save-stats, on the files its own listing finds
        model = _model(inception, args[0])
        mu, sigma = fid_score.compute_statistics_of_path(args[1], model, batch_size=3, dims=2048, device="cpu",
                                                         num_workers=0)
        np.savez_compressed(args[2], mu=mu, sigma=sigma)
    elif command == "clip":
        _clip(*args)
    elif command == "clip-model":
        _clip_model(*args)
    elif command == "clip-cosines":
        _clip_cosines(*args)
    elif command == "frechet":
        (m1, s1), (m2, s2) = (fid_score.compute_statistics_of_path(p, None, 1, 2048, "cpu") for p in args[:2])
        print(fid_score.calculate_frechet_distance(m1, s1, m2, s2))
    else:
        raise SystemExit(f"unknown command {command}")


def _open_clip_model(config_path: str):
    import json

    import open_clip

    config = json.loads(open(config_path).read())
    return config, open_clip.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"]).eval()


def _cosines(model, pixels, captions_path: str):
    import open_clip
    import torch
    import torch.nn.functional as F

    ids = open_clip.tokenize(open(captions_path).read().splitlines())
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(ids), dim=-1)
    return ids.numpy(), (image * text).sum(-1).numpy()


def _clip_model(config_path: str, seed: str, out: str):
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(int(seed))
    config, model = _open_clip_model(config_path)
    with torch.no_grad():
        for p in model.parameters():  # away from the init's ones and zeros, so every tensor matters
            p.add_(torch.randn_like(p) * 0.05)
    state = model.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, out + ".safetensors")
    torch.save(state, out + ".bin")
    return config, model


def _clip(config_path: str, seed: str, out: str, images_dir: str, captions_path: str) -> None:
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    config, model = _clip_model(config_path, seed, out)
    preprocess = open_clip.image_transform(config["vision_cfg"]["image_size"], is_train=False)
    files = sorted(os.listdir(images_dir))
    pixels = torch.stack([preprocess(Image.open(os.path.join(images_dir, f))) for f in files])
    ids, cosines = _cosines(model, pixels, captions_path)
    np.savez(out + ".npz", ids=ids, cosines=cosines)


def _clip_cosines(config_path: str, weights: str, images_path: str, captions_path: str, out: str) -> None:
    import numpy as np
    import open_clip
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    config, model = _open_clip_model(config_path)
    model.load_state_dict(load_file(weights))
    preprocess = open_clip.image_transform(config["vision_cfg"]["image_size"], is_train=False)
    images = np.load(images_path)
    pixels = torch.stack([preprocess(Image.fromarray((x * 255).astype(np.uint8))) for x in images])
    np.save(out, _cosines(model, pixels, captions_path)[1])


if __name__ == "__main__":
    main(sys.argv[1:])
