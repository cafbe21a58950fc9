"""SD 1.x/2.x txt2img (text encoding, classifier-free-guided DDIM loop, VAE decoding), compiled ahead
of time for a TPU slice, in sdjax's environment or a peer's (run as a subprocess).

    python -m benchmarks.aot_txt2img --impl sdjax --topology v5e:2x4 --chip-config default --bounds 2,2,1 --steps 2

The same program for all: prompt and negative-prompt token ids in, ``--size`` x ``--size`` images
out (512 by default, SD 1.5's and SD 2 base's); bf16 UNet and text encoder, f32 VAE (sdjax's
txt2img default), f32 DDIM arithmetic, guidance 7.5, batch split over the slice's devices,
parameters replicated. ``--unroll`` writes the DDIM loop out step by step (XLA's cost analysis
counts a loop's body once, whatever its trip count). Prints the compiler's
per-chip memory and cost as one JSON line; ``--hlo FILE`` also writes the compiled HLO, which
``python -m benchmarks.hlo_ops FILE`` breaks down op by op. ``--impl flax`` imports no sdjax.

An SDXL model JSON (one with ``text_encoder_2``) gets diffusers-Flax's SDXL pipeline instead, with
Euler, as a peer of ``python -m sdjax.aot --preset sdxl --what txt2img`` (docs/benchmarks.md); ``--impl
maxdiffusion`` compiles the other peer, MaxDiffusion's ``generate_sdxl`` (for SD 1.x/2.x its
``generate`` with DDIM; its environment: ``benchmarks/envs.py``, its source on PYTHONPATH). Neither
imports sdjax:

    python -c "import json, sdjax.presets as p; json.dump(p.get('sdxl'), open('sdxl.json', 'w'), default=list)"
    python -c "from benchmarks import envs; envs.python('.bench-envs', 'diffusers-flax', tpu=True)"
    .bench-envs/diffusers-flax/bin/python -m benchmarks.aot_txt2img --impl flax --model sdxl.json \\
        --topology v5:2x2x1 --chip-config megacore --bounds 2,2,1 --per-chip-batch 4 --size 1024 --steps 30
"""

import argparse
import functools
import json
import os
import tempfile
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from benchmarks import timing, tpu_slice


def sdjax_program(model: dict, mesh, steps: int, unroll: bool, B: int, size: int = 512):
    """(jitted fn, abstract args) of sdjax's txt2img."""
    from sdjax import generate, sources
    from sdjax.models.configs import ModelConfigs, abstract_params
    from sdjax.samplers import get_sampler

    configs = ModelConfigs.from_dicts(model)
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    nets = sources.generation_networks(configs, jnp.bfloat16, platform=mesh.devices.flat[0].platform)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), abstract_params(configs))
    ids = jax.ShapeDtypeStruct((B, 77), jnp.int32, sharding=batch)
    noise = jax.ShapeDtypeStruct((B, size // 8, size // 8, 4), jnp.float32, sharding=batch)
    plan = get_sampler("ddim").make_plan(configs.scheduler, steps)
    plan = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype, sharding=rep), plan)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)
    fn = jax.jit(lambda *a: generate.generate_on(mesh, nets, "ddim", 0, *a, unroll=unroll), out_shardings=batch)
    return fn, (params, generate.Inputs(ids, ids, noise), key, plan, scalar, scalar)


def _flax_generate(pipe, scheduler, params: dict, mesh, ids_shape: tuple, steps: int, size: int):
    """(jitted fn, abstract args) of a diffusers-Flax pipeline's ``_generate``: parameters replicated,
    prompt and negative-prompt ids of ``ids_shape`` split over the batch, guidance 7.5."""
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params)
    state = scheduler.create_state()
    ids = jax.ShapeDtypeStruct(ids_shape, jnp.int32, sharding=batch)
    prng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)

    def fn(params, ids, neg_ids, prng):
        return pipe._generate(ids, dict(params, scheduler=state), prng, steps, size, size, 7.5, None, neg_ids)

    return jax.jit(fn, out_shardings=batch), (params, ids, ids, prng)


def flax_program(model: dict, mesh, steps: int, unroll: bool, B: int, size: int = 512):
    """(jitted fn, abstract args) of diffusers-Flax 0.39's FlaxStableDiffusionPipeline._generate."""
    from diffusers import FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel
    from diffusers.pipelines.stable_diffusion import pipeline_flax_stable_diffusion
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    pipeline_flax_stable_diffusion.DEBUG = unroll  # its Python loop instead of fori_loop
    unet = FlaxUNet2DConditionModel.from_config(model["unet"], dtype=jnp.bfloat16)
    vae = FlaxAutoencoderKL.from_config(model["vae"], dtype=jnp.float32)
    text = FlaxCLIPTextModel(CLIPTextConfig(**model["text_encoder"]), dtype=jnp.bfloat16, _do_init=False)
    scheduler = FlaxDDIMScheduler.from_config(model["scheduler"])
    pipe = FlaxStableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, dtype=jnp.bfloat16)
    key = jax.random.key(0)
    params = {
        "unet": jax.eval_shape(unet.init, key, jnp.zeros((1, 4, size // 8, size // 8)), jnp.zeros((1,), jnp.int32),
                               jnp.zeros((1, 77, model["unet"]["cross_attention_dim"])))["params"],
        "vae": jax.eval_shape(vae.init, key, jnp.zeros((1, 3, size, size)))["params"],
        "text_encoder": jax.eval_shape(lambda k: text.init_weights(k, (1, 77)), key),
    }
    return _flax_generate(pipe, scheduler, params, mesh, (B, 77), steps, size)


def flax_sdxl_program(model: dict, mesh, steps: int, unroll: bool, B: int, size: int = 1024):
    """(jitted fn, abstract args) of diffusers-Flax 0.39's FlaxStableDiffusionXLPipeline._generate: both
    text encoders on prompt and negative-prompt ids (B, 2, 77), Euler (its Flax Euler spaces the
    timesteps "leading", as sdjax's SDXL preset), the guided UNet loop, the f32 VAE decoder. Its
    heads split as diffusers' own SDXL Flax example sets them (``split_head_dim=True``)."""
    from diffusers import (
        FlaxAutoencoderKL,
        FlaxEulerDiscreteScheduler,
        FlaxStableDiffusionXLPipeline,
        FlaxUNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion_xl import pipeline_flax_stable_diffusion_xl
    from transformers import CLIPTextConfig, FlaxCLIPTextModel, FlaxCLIPTextModelWithProjection

    pipeline_flax_stable_diffusion_xl.DEBUG = unroll  # its Python loop instead of fori_loop
    unet = FlaxUNet2DConditionModel.from_config(model["unet"], dtype=jnp.bfloat16, split_head_dim=True)
    vae = FlaxAutoencoderKL.from_config(model["vae"], dtype=jnp.float32)
    text = FlaxCLIPTextModel(CLIPTextConfig(**model["text_encoder"]), dtype=jnp.bfloat16, _do_init=False)
    text_2 = FlaxCLIPTextModelWithProjection(CLIPTextConfig(**model["text_encoder_2"]), dtype=jnp.bfloat16,
                                             _do_init=False)
    scheduler = FlaxEulerDiscreteScheduler.from_config(model["scheduler"])
    pipe = FlaxStableDiffusionXLPipeline(text_encoder=text, text_encoder_2=text_2, vae=vae, tokenizer=None,
                                         tokenizer_2=None, unet=unet, scheduler=scheduler, dtype=jnp.bfloat16)
    L, key = model["text_encoder"]["max_position_embeddings"], jax.random.key(0)
    params = {
        "unet": jax.eval_shape(unet.init_weights, key),  # builds SDXL's added conditioning itself
        "vae": jax.eval_shape(vae.init_weights, key),
        "text_encoder": jax.eval_shape(lambda k: text.init_weights(k, (1, L)), key),
        "text_encoder_2": jax.eval_shape(lambda k: text_2.init_weights(k, (1, L)), key),
    }
    return _flax_generate(pipe, scheduler, params, mesh, (B, 2, L), steps, size)  # both tokenizers' ids, stacked


class _Tokenizer:
    """Stands in for CLIPTokenizer (no download): generate_sdxl.tokenize calls it on config.prompt
    while tracing; the ids are constants of the program either way."""

    def __init__(self, length: int):
        self.model_max_length = length

    def __call__(self, prompts, **_):
        return types.SimpleNamespace(input_ids=np.zeros((len(prompts), self.model_max_length), np.int32))


def maxdiffusion_program(model: dict, mesh, steps: int, unroll: bool, B: int, size: int = 512,
                         attention: str | None = None, flash_min_seq_length: int = 4096, vae_dtype=jnp.float32):
    """(jitted fn, abstract args) of MaxDiffusion's own generation: ``generate_sdxl.run_inference`` with
    base_xl.yml for an SDXL model JSON, else ``generate.run_inference`` with base15.yml (SD 1.x) or
    base_2_base.yml (SD 2.x: 1024-wide text), its models built as its orbax-checkpoint loader does
    (BaseStableDiffusionCheckpointer.load_checkpoint) from ``model``'s config dicts, its states'
    shapes and shardings from max_utils.get_abstract_state.
    ``attention`` (None: the yml's where this environment has it): base_xl.yml's "dot_product" (QK^T
    in f32); "flash" is jax's splash kernel under shard_map, only where query and key have >=
    ``flash_min_seq_length`` tokens (SDXL's 64x64 level; SD's 64x64 level at 512 px). base_2_base.yml
    names "flash"; base15.yml names "tokamax_flash", whose package MaxDiffusion's requirements do not
    install, so SD 1.x takes "flash" too (for SD 1.5 at 512 px and 8 images per chip its flash
    kernels did not compile on v5p, out of scoped VMEM: ``--attention dot_product`` there).
    SD 1.x/2.x sample with its FlaxDDIMScheduler built from the model's scheduler config, where its
    ``generate.run`` builds the yml's ``diffusion_scheduler_config`` (PNDM for SD 1.5, none for SD 2):
    the one change, so that both sides run the same DDIM steps.
    ``vae_dtype``: f32 as sdjax; MaxDiffusion's loaders give the VAE activations_dtype (bf16)."""
    import maxdiffusion
    from maxdiffusion import (
        FlaxAutoencoderKL,
        FlaxDDIMScheduler,
        FlaxStableDiffusionPipeline,
        FlaxStableDiffusionXLPipeline,
        FlaxUNet2DConditionModel,
        generate,
        generate_sdxl,
        max_utils,
        maxdiffusion_utils,
        pyconfig,
    )
    from maxdiffusion.configuration_utils import FrozenDict
    from transformers import (
        CLIPTextConfig,
        FlaxCLIPTextModel,
        FlaxCLIPTextModelWithProjection,
    )

    n = mesh.devices.size
    assert B % n == 0, (B, n)
    sdxl = "text_encoder_2" in model
    yml = "base_xl.yml" if sdxl else "base_2_base.yml" if model["text_encoder"]["hidden_size"] == 1024 else "base15.yml"
    attention = attention or ("dot_product" if sdxl else "flash")
    pyconfig.initialize(["", os.path.join(os.path.dirname(maxdiffusion.__file__), "configs", yml),
                         "run_name=aot_generate", f"output_dir={tempfile.gettempdir()}",
                         "skip_jax_distributed_system=True", "compile_topology_num_slices=1",
                         "weights_dtype=float32", "activations_dtype=bfloat16", f"attention={attention}",
                         "split_head_dim=True", f"resolution={size}", f"num_inference_steps={steps}",
                         "guidance_scale=7.5", "guidance_rescale=0.0", f"per_device_batch_size={B // n}"]
                        + ["do_classifier_free_guidance=True"] * sdxl, unittest=True)  # SD's ymls guide always
    config = pyconfig.config
    # its mesh axes (data, fsdp, context, tensor) = (n, 1, 1, 1): the harness's 1-D data mesh, same device order
    md_mesh = Mesh(np.asarray(mesh.devices).reshape(-1, 1, 1, 1), tuple(config.mesh_axes))
    L = model["text_encoder"]["max_position_embeddings"]

    unet = FlaxUNet2DConditionModel.from_config(
        model["unet"], dtype=config.activations_dtype, weights_dtype=config.weights_dtype,
        split_head_dim=config.split_head_dim, norm_num_groups=config.norm_num_groups, attention_kernel=config.attention,
        flash_min_seq_length=flash_min_seq_length, flash_block_sizes=max_utils.get_flash_block_sizes(config),
        mesh=md_mesh, precision=max_utils.get_precision(config))
    vae = FlaxAutoencoderKL.from_config(model["vae"], dtype=vae_dtype, weights_dtype=config.weights_dtype)
    text = FlaxCLIPTextModel(CLIPTextConfig(**model["text_encoder"]), dtype=config.activations_dtype, _do_init=False)
    rng = jax.random.PRNGKey(config.seed)

    def abstract_state(module, init_fn):
        state, _, shardings = max_utils.get_abstract_state(module, None, config, md_mesh, init_fn, training=False)
        state = max_utils.unbox_logicallypartioned_trainstate(state)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

    def text_state(encoder):
        return abstract_state(encoder, functools.partial(encoder.init_weights, rng=rng, input_shape=(B, L)))

    # same parameters; its init_weights runs the UNet on jax.device_count() (this host's) images, which
    # the flash kernel's shard_map could not split over the slice
    init_unet = unet.clone(attention_kernel="dot_product")
    states = {"unet_state": abstract_state(unet, functools.partial(init_unet.init_weights, rng=rng)),
              "vae_state": abstract_state(vae, functools.partial(vae.init_weights, rng=rng)),
              "text_encoder_state": text_state(text)}
    if sdxl:
        text_2 = FlaxCLIPTextModelWithProjection(CLIPTextConfig(**model["text_encoder_2"]),
                                                 dtype=config.activations_dtype, _do_init=False)
        states["text_encoder_2_state"] = text_state(text_2)
        # create_scheduler finds the class through the config's module (a maxdiffusion FrozenDict) and applies
        # base_xl.yml's diffusion_scheduler_config: FlaxEulerDiscreteScheduler, epsilon, trailing spacing
        scheduler, scheduler_state = maxdiffusion_utils.create_scheduler(FrozenDict(dict(model["scheduler"])), config)
        pipeline = FlaxStableDiffusionXLPipeline(text_encoder=text, text_encoder_2=text_2, vae=vae, tokenizer=None,
                                                 tokenizer_2=None, unet=unet, scheduler=scheduler)
        pipeline.tokenizer = pipeline.tokenizer_2 = _Tokenizer(L)
        run_inference = generate_sdxl.run_inference
    else:
        scheduler = FlaxDDIMScheduler.from_config(dict(model["scheduler"]))
        scheduler_state = scheduler.create_state()
        pipeline = FlaxStableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet,
                                               scheduler=scheduler)
        pipeline.tokenizer = _Tokenizer(L)  # set after: registering a module reads its package's name
        run_inference = generate.run_inference
    run = functools.partial(run_inference, pipeline=pipeline, params={"scheduler": scheduler_state},
                            config=config, rng=rng, mesh=md_mesh, batch_size=B)
    fori_loop = jax.lax.fori_loop

    def fn(states):
        if not unroll:
            return run(states)
        with mock.patch.object(jax.lax, "fori_loop", functools.partial(fori_loop, unroll=True)):  # while tracing
            return run(states)

    out = NamedSharding(md_mesh, P(tuple(config.mesh_axes)))  # its run leaves out_shardings to the compiler
    return jax.jit(fn, out_shardings=out), (states,)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("sdjax", "flax", "maxdiffusion"), required=True,
                   help="maxdiffusion: its generate (SD 1.x/2.x, DDIM) or generate_sdxl (an SDXL model JSON)")
    p.add_argument("--model", required=True,
                   help="JSON file: the diffusers configs of unet, vae, text_encoder, scheduler")
    tpu_slice.add_args(p, "v5e:2x4")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--unroll", action="store_true", help="write the sampling loop out step by step")
    p.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 8)")
    p.add_argument("--attention",
                   help="maxdiffusion: its attention kernel (default: its yml's, see maxdiffusion_program)")
    p.add_argument("--hlo", help="also write the compiled program's HLO text here (for benchmarks.hlo_ops)")
    a = p.parse_args(argv)
    devices = tpu_slice.devices(a)
    mesh = Mesh(np.asarray(devices), ("data",))
    with open(a.model) as f:
        model = json.load(f)
    B = a.per_chip_batch * len(devices)
    if a.impl == "sdjax":
        if "text_encoder_2" in model:
            p.error("--impl sdjax compiles SD 1.x/2.x; for SDXL run: python -m sdjax.aot --preset sdxl --what txt2img")
        build = sdjax_program
    elif a.impl == "maxdiffusion":
        build = maxdiffusion_program
    else:
        build = flax_sdxl_program if "text_encoder_2" in model else flax_program
    if a.attention and a.impl != "maxdiffusion":
        p.error("--attention chooses MaxDiffusion's kernel: use it with --impl maxdiffusion")
    fn, args = build(model, mesh, a.steps, a.unroll, B, a.size, **({"attention": a.attention} if a.attention else {}))
    figures, hlo = tpu_slice.compile_figures(fn.lower(*args))
    if a.hlo:
        with open(a.hlo, "w") as f:
            f.write(hlo)
    timing.emit(dict(
        impl=a.impl, devices=len(devices), device_kind=devices[0].device_kind, per_chip_batch=a.per_chip_batch,
        steps=a.steps, unroll=a.unroll, size=a.size, **figures,
        versions=timing.versions("jax", "jaxlib", "flax", "libtpu", "diffusers", "transformers")))


if __name__ == "__main__":
    main()
