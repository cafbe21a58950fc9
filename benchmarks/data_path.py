"""The data path's speed: webdataset shards on local disk -> decoded, resized, cropped 512 px batches.

    python -m benchmarks.data_path --out docs/benchmarks-data.json
    ./run bench --only data

Writes img2dataset-like shards (JPEGs whose shorter side is 512, as ``--resize_mode keep_ratio
--image_size 512`` leaves them, in four aspect ratios) into a temporary folder and reads them
through ``sdjax.data.make_dataset`` (the reader training uses) with 1..N decode threads: images/s
after a warm-up batch, per thread, and the process's peak resident memory. Also prints how many
such cores a v5p-8 host needs to feed the fine-tuning step at its compiler-estimated rate.
"""

import argparse
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time

import numpy as np
from PIL import Image

ASPECTS = ((512, 512), (512, 683), (683, 512), (512, 910))  # (height, width): 1:1, 3:4, 4:3, 9:16
# v5p-8 (4 chips, one host), 512 px, compiler-estimated (docs/speed.md, docs/aot-sd15finetune-v5p8.json).
V5P8_STEP_IMAGES_PER_S = {"sd15_finetune full": 4 * 71.66, "sd15_finetune LoRA rank 16": 4 * 93.1}


def _image(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A photo-like JPEG: smooth colour fields plus fine noise (so it compresses like a photo)."""
    coarse = rng.integers(0, 256, (h // 32 + 1, w // 32 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.int16)
    pixels = np.clip(smooth + rng.integers(-12, 13, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_shards(folder: str, shards: int, per_shard: int, seed: int = 0) -> tuple[list[str], float]:
    """img2dataset-style shards; returns their paths and the mean JPEG size in KiB."""
    rng, sizes, paths = np.random.default_rng(seed), [], []
    for s in range(shards):
        path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                h, w = ASPECTS[i % len(ASPECTS)]
                for ext, data in (("jpg", _image(rng, h, w)), ("txt", f"a photo number {key}".encode()),
                                  ("json", json.dumps({"original_width": w * 2, "original_height": h * 2}).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                    if ext == "jpg":
                        sizes.append(len(data))
        paths.append(path)
    return paths, float(np.mean(sizes)) / 1024


def measure(folder: str, shards: int, threads: int, batch: int, batches: int) -> dict:
    from sdjax.data import DataConfig, make_dataset

    config = DataConfig(name="webdataset", files=f"{folder}/{{00000..{shards - 1:05d}}}.tar", image_size=512,
                        batch_size=batch, num_threads=threads, random_crop=True, random_flip=True,
                        shard_index=0, shard_count=1)
    it = make_dataset(config)
    next(it)  # warm-up: opens the shards, fills the shuffle window
    t0 = time.perf_counter()
    for _ in range(batches):
        b = next(it)
    seconds = time.perf_counter() - t0
    assert b["image"].shape == (batch, 512, 512, 3)
    it.close()
    return {"threads": threads, "images_per_s": batch * batches / seconds, "seconds": seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--batches", type=int, default=24)
    p.add_argument("--threads", default=f"1,{os.cpu_count()}", help="comma-separated decode thread counts")
    p.add_argument("--out", default=None, help="JSON file to write")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        _, jpeg_kib = write_shards(folder, a.shards, a.per_shard)
        runs = [measure(folder, a.shards, int(t), a.batch, a.batches) for t in dict.fromkeys(a.threads.split(","))]
    # Per core from the run on every core (the reader's own thread shares them): the conservative figure.
    widest = max(runs, key=lambda r: r["threads"])
    per_core = widest["images_per_s"] / min(widest["threads"], os.cpu_count())
    needs = {name: rate / per_core for name, rate in V5P8_STEP_IMAGES_PER_S.items()}
    result = {"machine": f"{os.cpu_count()} CPU cores ({_cpu_name()})", "jpeg_kib_mean": jpeg_kib,
              "source_sizes": [f"{h}x{w}" for h, w in ASPECTS], "output": "512x512 f32, random crop + flip",
              "runs": runs, "images_per_s_per_core": per_core, "v5p8_host_step_images_per_s": V5P8_STEP_IMAGES_PER_S,
              "v5p8_host_cores_needed": needs}
    print("| decode threads | images/s | peak RSS MiB |\n|---|---|---|")
    for r in runs:
        print(f"| {r['threads']} | {r['images_per_s']:.1f} | {r['peak_rss_mib']:.0f} |")
    print(f"\n{per_core:.1f} images/s per core (JPEG {jpeg_kib:.0f} KiB mean, shorter side 512 -> 512x512 crops); "
          "a v5p-8 host needs, at the step's compiler-estimated rate:")
    for name, cores in needs.items():
        print(f"  {name}: {V5P8_STEP_IMAGES_PER_S[name]:.0f} images/s -> {cores:.0f} cores")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


if __name__ == "__main__":
    main(sys.argv[1:])
