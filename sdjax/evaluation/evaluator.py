"""FID and CLIP score of a model's own images, drawn from a caption list as MLPerf's Stable Diffusion
benchmark draws them: DDIM, 50 steps, eta 0, guidance 8, 512 px, an empty negative prompt, every
caption once.

The captions go through the compiled generation (``sdjax.generate.generate``) in global batches split
over every device of every host; the last batch is padded and its padding never reaches a metric.
Image j's starting noise depends only on (seed, j), so the images do not depend on the batch size or
the device count. Each host then measures the images its own devices hold: Inception features from the
float images (no PNG rounding) and CLIP cosines through open_clip's transform (``clip_score``), on its
local devices. Features and cosines are gathered from every host; the statistics and the Frechet
distance are computed on the host in float64 (``fid``), exactly as for image folders.
"""

import dataclasses
import json
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image

from sdjax import generate, images as images_lib, paths, sharding
from sdjax.evaluation import clip_score
from sdjax.evaluation.fid import Statistics, frechet_distance
from sdjax.evaluation.captions import Caption
from sdjax.evaluation.features import InceptionFeatures
from sdjax.models.clip import CLIPConfig
from sdjax.samplers import get_sampler
from sdjax.tokenizer import tokenize


@dataclasses.dataclass(frozen=True)
class Protocol:
    """How the evaluated images are drawn (the defaults are MLPerf's). ``size``: the image side
    (None: the model's native size); ``batch_size``: images per compiled call over all devices,
    rounded up to a multiple of the device count."""
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 8.0
    size: int | None = 512
    negative_prompt: str = ""
    seed: int = 0
    batch_size: int = 64


@dataclasses.dataclass(frozen=True)
class Judges:
    """The networks that score the images: pytorch-fid's Inception with the reference statistics, and
    an open_clip model with its tokenizer. Either may be absent (that metric is not computed)."""
    inception: Any = None  # FIDInceptionV3 parameters
    reference: Statistics | None = None
    clip: Any = None  # CLIPModel parameters
    clip_config: CLIPConfig = CLIPConfig()
    clip_tokenizer: Any = None

    def __post_init__(self):
        if (self.inception is None) != (self.reference is None):
            raise ValueError("FID needs both the Inception weights and the reference statistics.")
        if (self.clip is None) != (self.clip_tokenizer is None):
            raise ValueError("CLIP score needs both the CLIP weights and its tokenizer.")
        if self.inception is None and self.clip is None:
            raise ValueError("nothing to measure: give the Inception weights and reference statistics (FID), "
                             "the CLIP weights and tokenizer (CLIP score), or both.")

    @classmethod
    def load(cls, *, inception: str | None = None, ref_stats: str | None = None, clip: str | None = None,
             clip_config: str | None = None, clip_tokenizer: str | None = None, allow_pickle: bool = False) -> "Judges":
        """The judges from their files (local or gs://): pytorch-fid's Inception weights, reference
        statistics (.npz), open_clip weights, open_clip's model config JSON (None: ViT-H-14) and a CLIP
        tokenizer (open_clip's bpe file or a tokenizer folder). PyTorch pickles only with ``allow_pickle``."""
        from sdjax.checkpoints.load import load_inception
        from sdjax.checkpoints.open_clip import load_clip
        from sdjax.tokenizer import load_tokenizer

        def local(path: str | None, what: str) -> str | None:
            return paths.readable(path, what) if path else None

        config = read_clip_config(clip_config)
        return cls(inception=load_inception(local(inception, "inception"), allow_pickle) if inception else None,
                   reference=Statistics.load(local(ref_stats, "ref_stats")) if ref_stats else None,
                   clip=load_clip(local(clip, "clip"), config, allow_pickle) if clip else None, clip_config=config,
                   clip_tokenizer=load_tokenizer(clip_tokenizer) if clip_tokenizer else None)


def read_clip_config(path: str | None) -> CLIPConfig:
    """The CLIP judge's architecture from open_clip's model config JSON (local or gs://); None: ViT-H-14."""
    if not path:
        return CLIPConfig()
    with open(paths.readable(path, "clip_config"), encoding="utf-8") as f:
        return CLIPConfig.from_open_clip(json.load(f))


@dataclasses.dataclass(frozen=True)
class Result:
    """What one evaluation measured (a metric without its judge is None)."""
    images: int
    fid: float | None = None
    clip_score: float | None = None
    statistics: Statistics | None = None  # the images' FID statistics

    def scalars(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in ("fid", "clip_score") if getattr(self, k) is not None}


class Evaluator:
    """``evaluator(params, captions, scaling_factor)`` -> ``Result`` for one model.

    ``nets``/``scheduler_config``: the model's generation networks and noise schedule; ``tokenize``:
    its tokenizer (prompts -> ids); ``mesh``: the devices to generate on (the batch is split over all
    of its axes); ``latent_channels``/``downsample_factor``: the latent shape. One compilation per
    evaluator."""

    def __init__(self, nets: generate.Networks, scheduler_config: Any, tokenize_fn: Callable[[list[str]], np.ndarray],
                 protocol: Protocol, judges: Judges, mesh: Mesh, *, latent_channels: int, downsample_factor: int,
                 native_size: int, compiler_options: dict | None = None):
        self.protocol, self.judges, self.tokenize_fn = protocol, judges, tokenize_fn
        size = protocol.size or native_size
        if size % max(8, downsample_factor):
            raise ValueError(f"eval size {size} is not a multiple of {max(8, downsample_factor)}.")
        if protocol.steps < 1 or protocol.batch_size < 1:
            raise ValueError(f"eval steps ({protocol.steps}) and batch size ({protocol.batch_size}) must be >= 1.")
        side = size // downsample_factor
        self.latent_shape = (side, side, latent_channels)
        devices = mesh.devices.size
        self.batch_size = -(-protocol.batch_size // devices) * devices
        self.plan = get_sampler(protocol.sampler).make_plan(scheduler_config, protocol.steps, eta=protocol.eta)
        self.rows = NamedSharding(mesh, P(tuple(mesh.axis_names)))  # the batch over every device
        self._uncond_ids = tokenize_fn([protocol.negative_prompt] * self.batch_size)  # the same for every batch
        self._generate = jax.jit(lambda *a: generate.generate_on(mesh, nets, protocol.sampler, 0, *a),
                                 out_shardings=self.rows, compiler_options=compiler_options)
        here = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
        local = self.batch_size // devices * here  # the rows this host's devices hold
        self._inception = None if judges.inception is None else InceptionFeatures(judges.inception, local)
        self._clip = None if judges.clip is None else clip_score.CLIPScorer(judges.clip, judges.clip_config, local)

    @classmethod
    def of(cls, sd: Any, protocol: Protocol, judges: Judges, mesh: Mesh | None = None) -> "Evaluator":
        """An evaluator of a loaded ``StableDiffusion`` on ``mesh`` (default: every device of every host)."""
        return cls(sd.generator.nets, sd.configs.scheduler, sd.tokenize, protocol, judges,
                   mesh or sharding.data_mesh(), latent_channels=sd.configs.vae.latent_channels,
                   downsample_factor=sd.downsample_factor, native_size=sd.native_size)

    def replicated(self, params: Any) -> Any:
        """``params`` copied to every device of the mesh."""
        return jax.device_put(params, NamedSharding(self.rows.mesh, P()))

    def images(self, params: dict[str, Any], prompts: Sequence[str], first: int,
               scaling_factor: float | jax.Array) -> jax.Array:
        """Images (batch_size, H, W, 3) in [0, 1] for ``prompts`` (at most ``batch_size``; the rest is
        padding), split over the mesh; ``first``: the first prompt's index in the caption list."""
        p = self.protocol
        n = len(prompts)
        prompts = list(prompts) + [prompts[-1]] * (self.batch_size - n)
        ids = self.tokenize_fn(prompts)
        noise = generate.starting_noise(p.seed, self.batch_size, self.latent_shape, first=first)
        inputs = generate.Inputs(ids, self._uncond_ids, noise)
        inputs = jax.device_put(inputs, jax.tree.map(lambda _: self.rows, inputs))
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(p.seed), generate.SAMPLER_STREAM), first)
        return self._generate(params, inputs, key, self.plan, jnp.float32(p.guidance_scale),
                              jnp.asarray(scaling_factor, jnp.float32))

    def __call__(self, params: dict[str, Any], captions: Sequence[Caption], scaling_factor: float | jax.Array,
                 images_dir: str | None = None, progress: bool = True) -> Result:
        """The metrics of the model's images for ``captions`` (every host passes the same list).
        ``images_dir``: also write each image there as ``{caption.name}.png`` (each host its own)."""
        if not captions:
            raise ValueError("no captions to evaluate with.")
        features, cosines, start = [], [], time.time()
        for first in range(0, len(captions), self.batch_size):
            batch = captions[first:first + self.batch_size]
            images = self.images(params, [c.text for c in batch], first, scaling_factor)
            rows, pixels = local_rows(images)
            valid = rows < len(batch)
            rows, pixels = rows[valid], pixels[valid]
            if images_dir is not None:
                for r, image in zip(rows, pixels):
                    _write_png(epath.Path(images_dir) / f"{batch[r].name}.png", image)
            measured = {"rows": rows}
            if self._inception is not None:
                measured["features"] = self._inception(pixels)
            if self._clip is not None:
                ids = tokenize(self.judges.clip_tokenizer, [batch[r].text for r in rows],
                               self.judges.clip_config.text.max_position_embeddings)
                measured["cosines"] = self._clip.cosines(pixels, ids)
            gathered = _gather(measured, len(rows))
            order = np.argsort(gathered["rows"])
            features += [gathered["features"][order]] if "features" in gathered else []
            cosines += [gathered["cosines"][order]] if "cosines" in gathered else []
            if progress and jax.process_index() == 0:
                done = first + len(batch)
                print(f"eval: {done}/{len(captions)} images ({done / (time.time() - start):.2f} images/s)",
                      file=sys.stderr, flush=True)
        stats = Statistics.of(np.concatenate(features)) if features else None
        return Result(len(captions), fid=None if stats is None else frechet_distance(stats, self.judges.reference),
                      clip_score=clip_score.score(np.concatenate(cosines)) if cosines else None, statistics=stats)


def local_rows(x: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a batch-split array that this host's devices hold (each once), with their indices."""
    blocks = {}
    for shard in x.addressable_shards:
        start = shard.index[0].start or 0
        if start not in blocks:
            blocks[start] = np.asarray(shard.data)
    starts = sorted(blocks)
    rows = np.concatenate([np.arange(s, s + blocks[s].shape[0]) for s in starts])
    return rows, np.concatenate([blocks[s] for s in starts])


def _gather(measured: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """Every host's rows of ``measured``; hosts may hold different numbers of valid rows (the padded
    last batch), so each pads to the largest count and the padding is dropped after the gather."""
    if jax.process_count() == 1:
        return measured
    counts = np.asarray(multihost_utils.process_allgather(np.asarray([count], np.int32))).reshape(-1)
    most = int(counts.max())
    padded = {k: np.concatenate([v, np.zeros((most - count, *v.shape[1:]), v.dtype)]) for k, v in measured.items()}
    gathered = jax.tree.map(np.asarray, multihost_utils.process_allgather(padded))
    return {k: np.concatenate([v[h, :c] for h, c in enumerate(counts)]) for k, v in gathered.items()}


def _write_png(path: epath.Path, image_HWC: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        Image.fromarray(images_lib.to_uint8(image_HWC)).save(f, format="PNG")
