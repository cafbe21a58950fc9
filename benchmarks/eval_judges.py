"""The evaluation's judges on this CPU, beside the references users would run instead: pytorch-fid's
Inception (512 px float images -> 2048 features, resized to 299 inside) and open_clip's ViT-H-14
(image and caption -> their cosine), images/s; and the host's CLIP preprocessing (PIL) per image.

    python -m benchmarks.eval_judges --out docs/benchmarks-eval.json
    ./run bench --only eval

Full-size networks with random weights (nothing is downloaded; speed does not depend on the
values), f32 in both frameworks, the same batch (8 images for Inception, 2 pairs for CLIP). Each
framework runs in a process of its own (a ViT-H-14 is 4 GiB of f32 weights), jax's and torch's own
thread pools on every core; each time is the median of ``--repeats`` calls after one warm-up call
(jax's first call compiles).
"""

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import timing

INCEPTION_SIZE = 512  # MLPerf's images
VIT_H_14 = os.path.join("open_clip", "model_configs", "ViT-H-14.json")


def _jax(what: str, batch: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sdjax.evaluation import clip_score, features
    from sdjax.models.clip import CLIPConfig, CLIPModel
    from sdjax.models.inception import FIDInceptionV3

    rng, key = np.random.default_rng(0), jax.random.key(0)
    if what == "inception":
        images = jnp.asarray(rng.uniform(size=(batch, INCEPTION_SIZE, INCEPTION_SIZE, 3)), jnp.float32)
        params = jax.jit(FIDInceptionV3().init)(key, images[:1])["params"]
        fn, args = jax.jit(features.inception_fn()), (params, images)
    elif what == "clip":
        config = CLIPConfig()
        side = config.vision.image_size
        pixels = jnp.asarray(rng.normal(size=(batch, side, side, 3)), jnp.float32)
        ids = jnp.asarray(rng.integers(1, 49000, (batch, config.text.max_position_embeddings)), jnp.int32)
        params = jax.jit(CLIPModel(config).init)(key, pixels[:1], ids[:1])["params"]
        fn, args = jax.jit(clip_score.cosines_fn(config)), (params, pixels, ids)
    else:  # the host's preprocessing of one 512 px float image for the CLIP tower (PIL)
        image = rng.uniform(size=(INCEPTION_SIZE, INCEPTION_SIZE, 3)).astype(np.float32)
        r = timing.measure(lambda: clip_score.preprocess(image, CLIPConfig().vision.image_size), lambda x: x,
                           repeats=max(repeats, 20))
        return {"images_per_s": 1 / r["median_s"], **r}
    r = timing.measure(lambda: fn(*args), jax.block_until_ready, repeats)
    return {"images_per_s": batch / r["median_s"], **r}


def _torch(what: str, batch: int, repeats: int) -> dict:
    import numpy as np
    import torch

    from tests import eval_reference

    _, inception = eval_reference._import_references()  # pytorch-fid and open_clip, as the tests import them
    torch.manual_seed(0)
    if what == "inception":
        state = eval_reference._random_state_dict(0)
        inception.load_state_dict_from_url = lambda *a, **k: state  # where pytorch-fid would download
        model = inception.InceptionV3([3]).eval()
        images = torch.rand(batch, 3, INCEPTION_SIZE, INCEPTION_SIZE)
        run = lambda: model(images)[0]  # noqa: E731
    elif what == "clip":
        import open_clip
        import torch.nn.functional as F

        with open(os.path.join(eval_reference.REFERENCE_DIR, VIT_H_14)) as f:
            config = json.load(f)
        model = open_clip.CLIP(config["embed_dim"], config["vision_cfg"], config["text_cfg"]).eval()
        pixels = torch.randn(batch, 3, 224, 224)
        ids = torch.from_numpy(np.random.default_rng(0).integers(1, 49000, (batch, 77)))

        def run():
            image = F.normalize(model.encode_image(pixels), dim=-1)
            return (image * F.normalize(model.encode_text(ids), dim=-1)).sum(-1)
    else:
        raise ValueError(what)
    with torch.no_grad():
        r = timing.measure(run, lambda x: x, repeats)
    return {"images_per_s": batch / r["median_s"], **r}


def _runner(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("framework", choices=("jax", "torch"))
    p.add_argument("what", choices=("inception", "clip", "clip-preprocess"))
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--repeats", type=int, required=True)
    a = p.parse_args(argv)
    out = (_jax if a.framework == "jax" else _torch)(a.what, a.batch, a.repeats)
    print(timing.RESULT_PREFIX + json.dumps(out), flush=True)


def _run(*args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, all its cores
    done = subprocess.run([sys.executable, "-m", "benchmarks.eval_judges", "--runner", *args], capture_output=True,
                          text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return timing.parse(done.stdout)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--runner":
        _runner(argv[1:])
        return {}
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inception-batch", type=int, default=8)
    p.add_argument("--clip-batch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the results as JSON here")
    a = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows, results = [], {"machine": timing.machine(), "started": started}
    for what, batch in (("inception", a.inception_batch), ("clip", a.clip_batch)):
        ours, ref = (_run(fw, what, "--batch", str(batch), "--repeats", str(a.repeats)) for fw in ("jax", "torch"))
        results[what] = {"batch": batch, "sdjax": ours, "reference": ref}
        rows.append((what, batch, ours["images_per_s"], ref["images_per_s"], ours["first_call_s"]))
    results["clip-preprocess"] = _run("jax", "clip-preprocess", "--batch", "1", "--repeats", str(a.repeats))
    names = {"inception": "Inception (pytorch-fid), 512 px", "clip": "CLIP ViT-H-14 (open_clip), 224 px + caption"}
    print("| judge | batch | sdjax images/s | reference images/s | sdjax / reference | sdjax first call (s) |")
    print("|---|---|---|---|---|---|")
    for what, batch, ours, ref, first in rows:
        print(f"| {names[what]} | {batch} | {ours:.2f} | {ref:.2f} | {ours / ref:.2f} | {first:.1f} |")
    print(f"CLIP preprocessing on the host (PIL, one 512 px image): {results['clip-preprocess']['images_per_s']:.0f} "
          "images/s per core")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
