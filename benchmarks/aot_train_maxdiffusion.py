"""MaxDiffusion's own train step (SD 2 base, or SDXL), compiled ahead of time for a TPU slice: the
peer of ``python -m sdjax.aot --config sd2_base`` / ``--config sdxl_finetune`` (docs/benchmarks.md).

    PYTHONPATH=.:maxdiffusion/src .bench-envs/maxdiffusion/bin/python -m benchmarks.aot_train_maxdiffusion \\
        --model sd2base.json --topology v5:2x2x1 --chip-config megacore --bounds 2,2,1 --per-chip-batch 8

Runs in MaxDiffusion's environment (``benchmarks/envs.py``, its source on PYTHONPATH) and imports no
sdjax. What is compiled is its trainer's ``compile_train_step`` as is (``StableDiffusionTrainer``, or
``StableDiffusionXLTrainer`` for a model JSON with ``text_encoder_2``): its ``_train_step``, jitted
with its state and data shardings and its donation, on its config file (``base_2_base.yml`` /
``base_xl.yml``) with only these settings changed: batch, resolution, f32 weights and bf16
activations (as its configs say), ``skip_jax_distributed_system`` (no TPU here), and the dataset
type, which decides what the step computes:

- SD 2 base: ``dataset_type=grain``, MLPerf's layout: the batch holds the VAE posteriors' moments
  (sampled in the step) and the text encoder's outputs; UNet forward and backward, AdamW.
- SDXL: ``dataset_type=hf`` (``--cached`` for ``tf`` with cached latents and text-encoder outputs):
  the batch holds images and both tokenizers' ids, and the step runs the VAE encoder and both text
  encoders before the UNet, as sdjax's ``sdxl_finetune`` does.

Its models are built as its checkpoint loader builds them (``FlaxUNet2DConditionModel`` with its
config's attention kernel, split heads and flash block sizes; transformers' Flax CLIP), from
``--model`` (the diffusers configs of unet, vae, text_encoder(s), scheduler), their states' shapes
and shardings from its ``max_utils.get_abstract_state`` (nothing is initialised). Its mesh is
(data, fsdp, context, tensor) = (devices, 1, 1, 1), as its configs' ``ici_data_parallelism=-1``
gives. Prints the compiler's per-chip memory and cost as one JSON line.
"""

import argparse
import functools
import json
import os
import tempfile
import time
from unittest import mock

import jax
import numpy as np
from jax.sharding import Mesh

from benchmarks import timing, tpu_slice


def _config(yml: str, n: int, per_chip_batch: int, size: int, dataset_type: str, extra: list[str]):
    from maxdiffusion import pyconfig

    args = ["", yml, "run_name=aot_train", f"output_dir={tempfile.gettempdir()}", "skip_jax_distributed_system=True",
            "compile_topology_num_slices=1", "weights_dtype=float32", "activations_dtype=bfloat16",
            f"resolution={size}", f"per_device_batch_size={per_chip_batch}", f"dataset_type={dataset_type}",
            "cache_latents_text_encoder_outputs=True", "write_metrics=False", "write_timing_metrics=False", *extra]
    with mock.patch.object(jax, "device_count", lambda: n):  # its global batch: per device x the slice's chips
        pyconfig.initialize(args, unittest=True)
    return pyconfig.config


def _abstract_state(module, tx, config, mesh, init_fn, training: bool):
    """A state's abstract arrays with their shardings, and the shardings (its get_abstract_state)."""
    from maxdiffusion import max_utils

    state, _, shardings = max_utils.get_abstract_state(module, tx, config, mesh, init_fn, training=training)
    state = max_utils.unbox_logicallypartioned_trainstate(state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings), shardings


def compile_step(model: dict, devices: list, per_chip_batch: int, size: int, cached: bool, extra: list[str]):
    """(compiled step, compile seconds, its global batch) of MaxDiffusion's trainer for ``model``."""
    import maxdiffusion
    from maxdiffusion import FlaxAutoencoderKL, FlaxDDPMScheduler, FlaxUNet2DConditionModel, max_utils
    from maxdiffusion.trainers.sdxl_trainer import StableDiffusionXLTrainer
    from maxdiffusion.trainers.stable_diffusion_trainer import StableDiffusionTrainer
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    xl, n = "text_encoder_2" in model, len(devices)
    yml = os.path.join(os.path.dirname(maxdiffusion.__file__), "configs", "base_xl.yml" if xl else "base_2_base.yml")
    dataset_type = ("tf" if cached else "hf") if xl else "grain"
    config = _config(yml, n, per_chip_batch, size, dataset_type, extra)
    mesh = Mesh(np.asarray(devices).reshape(-1, 1, 1, 1), tuple(config.mesh_axes))
    B, L = per_chip_batch * n, model["text_encoder"]["max_position_embeddings"]

    unet = FlaxUNet2DConditionModel.from_config(
        model["unet"], dtype=config.activations_dtype, weights_dtype=config.weights_dtype,
        split_head_dim=config.split_head_dim, norm_num_groups=config.norm_num_groups, attention_kernel=config.attention,
        flash_min_seq_length=getattr(config, "flash_min_seq_length", 4096),
        flash_block_sizes=max_utils.get_flash_block_sizes(config), mesh=mesh, precision=max_utils.get_precision(config))
    vae = FlaxAutoencoderKL.from_config(model["vae"], dtype=config.activations_dtype,
                                        weights_dtype=config.weights_dtype)
    text = FlaxCLIPTextModel(CLIPTextConfig(**model["text_encoder"]), dtype=config.activations_dtype, _do_init=False)
    scheduler = FlaxDDPMScheduler.from_config(dict(model["scheduler"]))
    pipeline = type("Pipeline", (), {})()
    pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.scheduler = unet, vae, text, scheduler
    params = {"scheduler": scheduler.create_state()}

    rng = jax.random.PRNGKey(config.seed)
    lr = max_utils.create_learning_rate_schedule(config.learning_rate, config.learning_rate_schedule_steps,
                                                 config.warmup_steps_fraction, config.max_train_steps)
    tx = max_utils.create_optimizer(config, lr)
    # same parameters; its init_weights runs the UNet on this host's devices, which a flash kernel's
    # shard_map over the slice's mesh could not split
    init_unet = unet.clone(attention_kernel="dot_product")
    states, shardings = {}, {}
    states["unet_state"], shardings["unet_state_shardings"] = _abstract_state(
        unet, tx, config, mesh, functools.partial(init_unet.init_weights, rng=rng), training=True)
    states["vae_state"], shardings["vae_state_shardings"] = _abstract_state(
        vae, None, config, mesh, functools.partial(vae.init_weights, rng=rng), training=False)
    states["text_encoder_state"], _ = _abstract_state(
        text, None, config, mesh, functools.partial(text.init_weights, rng=rng, input_shape=(B, L)), training=False)
    trainer_class = StableDiffusionTrainer
    if xl:
        text_2 = FlaxCLIPTextModelWithProjection(CLIPTextConfig(**model["text_encoder_2"]),
                                                 dtype=config.activations_dtype, _do_init=False)
        pipeline.text_encoder_2 = text_2
        states["text_encoder_2_state"], _ = _abstract_state(
            text_2, None, config, mesh, functools.partial(text_2.init_weights, rng=rng, input_shape=(B, L)),
            training=False)
        trainer_class = StableDiffusionXLTrainer

    trainer = trainer_class.__new__(trainer_class)  # its methods, without its checkpoint manager and writers
    trainer.config, trainer.mesh, trainer.rng, trainer.total_train_batch_size = config, mesh, rng, B
    t0 = time.perf_counter()
    compiled = trainer.compile_train_step(pipeline, params, states, shardings, trainer.get_data_shardings())
    return compiled, time.perf_counter() - t0, B, dataset_type, config.attention


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="JSON file: the diffusers configs of unet, vae, text encoder(s), "
                                                   "scheduler")
    tpu_slice.add_args(p, "v5:2x2x1")
    p.add_argument("--size", type=int, default=512, help="image side in pixels")
    p.add_argument("--cached", action="store_true", help="SDXL: its cached latents and text-encoder outputs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another setting of its config, e.g. attention=dot_product")
    a = p.parse_args(argv)
    devices = tpu_slice.devices(a)
    with open(a.model) as f:
        model = json.load(f)
    compiled, compile_s, B, dataset_type, attention = compile_step(model, devices, a.per_chip_batch, a.size, a.cached,
                                                                   a.set)
    figures, _ = tpu_slice.figures_of(compiled)
    timing.emit(dict(
        impl="maxdiffusion", what="train step", devices=len(devices), device_kind=devices[0].device_kind,
        per_chip_batch=a.per_chip_batch, global_batch=B, size=a.size, dataset_type=dataset_type, attention=attention,
        settings=a.set, compile_s=compile_s, **figures,
        versions=timing.versions("jax", "jaxlib", "flax", "libtpu", "transformers")))


if __name__ == "__main__":
    main()
