"""LoRA: the adapters people share, applied as diffusers applies them.

Reference: a tiny diffusers pipeline with a random PEFT LoRA on the UNet (attention, projections,
feed-forward, resnet convs) and the text encoder, saved by diffusers' ``save_lora_weights`` with
its rank/alpha metadata; diffusers' ``load_lora_weights`` + ``set_adapters`` samples the reference
images. The same tensors rewritten in kohya's layout must give the same images.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from sdjax import generate
from sdjax.checkpoints.errors import CheckpointError
from sdjax.stable_diffusion import StableDiffusion
from tests import tiny_models
from tests.helpers import free_port, logs_tail, readme_block, subprocess_env, write_image_folder

PROMPTS = ["a photo of a cat", "a dog"]
SIZE, STEPS, SCALE = 16, 10, 7.5
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tiny_models.save_pipeline(tmp_path_factory.mktemp("lora") / "pipe", "sd1", seed=8)


@pytest.fixture(scope="module")
def sd(base):
    return StableDiffusion.from_pretrained(base)  # shared: its copies with LoRAs reuse the compiled sampler


@pytest.fixture(scope="module")
def peft_lora(base, tmp_path_factory):
    """A random LoRA (rank 4, alpha 8 on the UNet; rank 2, alpha 3 on the text encoder) saved by diffusers."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(base)
    torch.manual_seed(0)
    unet_config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, target_modules=TEXT_TARGETS)
    inject_adapter_in_model(unet_config, pipe.unet)
    inject_adapter_in_model(text_config, pipe.text_encoder)
    folder = tmp_path_factory.mktemp("lora") / "my-lora"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder), safe_serialization=True,
        unet_lora_adapter_metadata=unet_config.to_dict(), text_encoder_lora_adapter_metadata=text_config.to_dict())
    return folder / "pytorch_lora_weights.safetensors"


def to_kohya(peft_file, out_file):
    """The same adapters in kohya's layout: lora_unet_/lora_te_ names, lora_down/lora_up, an alpha per layer."""
    from safetensors import safe_open

    with safe_open(str(peft_file), "np") as f:
        meta = {k.replace(".", "/", 1): v for k, v in json.loads(f.metadata()["lora_adapter_metadata"]).items()}
    tensors, out = load_file(str(peft_file)), {}
    for key, value in tensors.items():
        network, rest = key.split(".", 1)
        module, part = rest.rsplit(".lora_", 1)
        if network == "unet":
            name = "lora_unet_" + module.replace(".", "_")
        else:
            name = "lora_te_text_model_" + module.removeprefix("text_model.").replace(".", "_")
        out[f"{name}.lora_{'down' if part.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.asarray(meta[f"{network}/lora_alpha"], np.float32)
    save_file(out, str(out_file))
    return out_file


def _noise(sd):
    return generate.starting_noise(9, len(PROMPTS), (SIZE // sd.downsample_factor, SIZE // sd.downsample_factor, 4))


def _diffusers_images(base, lora_file, scale, noise):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(os.path.dirname(lora_file), weight_name=os.path.basename(lora_file), adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[scale])
    return pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
                latents=torch.from_numpy(np.ascontiguousarray(noise.transpose(0, 3, 1, 2))), output_type="np").images


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_peft_lora_matches_diffusers(base, sd, peft_lora, scale):
    noise = _noise(sd)
    kw = dict(steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE, init_latents=noise, output="float")
    ours = sd.with_lora(peft_lora, scale=scale).txt2img(PROMPTS, **kw)
    ref = _diffusers_images(base, peft_lora, scale, noise)
    assert np.abs(ours - ref).mean() <= 3e-4
    assert np.abs(ref - sd.txt2img(PROMPTS, **kw)).mean() > 0.01  # the LoRA changes the images


def test_kohya_layout_gives_the_same_images(base, sd, peft_lora, tmp_path):
    kohya = to_kohya(peft_lora, tmp_path / "kohya.safetensors")
    noise = _noise(sd)
    kw = dict(steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE, init_latents=noise, output="float")
    from_peft = sd.with_lora(peft_lora).txt2img(PROMPTS, **kw)
    from_kohya = sd.with_lora(kohya).txt2img(PROMPTS, **kw)
    np.testing.assert_allclose(from_kohya, from_peft, atol=1e-5)
    assert np.abs(from_kohya - _diffusers_images(base, kohya, 1.0, noise)).mean() <= 3e-4


def test_with_lora_leaves_the_model_alone_and_does_not_recompile(base, peft_lora):
    sd = StableDiffusion.from_pretrained(base)
    before = jax.tree.map(np.asarray, sd.params)
    kw = dict(steps=2, height=SIZE, width=SIZE, output="float")
    plain = sd.txt2img(PROMPTS, **kw)
    compiled = sd.generator._compiled[("ddim", generate.Span(), (False, False, False))]
    size = compiled._cache_size()
    twice = sd.with_lora(peft_lora, scale=0.5).with_lora(peft_lora, scale=0.5)  # chained
    once = sd.with_lora(peft_lora, scale=1.0)
    np.testing.assert_allclose(twice.txt2img(PROMPTS, **kw), once.txt2img(PROMPTS, **kw), atol=1e-5)
    assert compiled._cache_size() == size and twice.generator is sd.generator
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(sd.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_array_equal(sd.txt2img(PROMPTS, **kw), plain)


def test_loras_that_do_not_fit_are_refused_by_name(sd, peft_lora, tmp_path):
    tensors = load_file(str(peft_lora))
    sdxl = dict(tensors,
                **{f"text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_{x}.weight": np.zeros((8, 8), np.float32)
                   for x in "AB"})
    save_file(sdxl, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(CheckpointError, match="adapts text_encoder_2, which this model does not have"):
        sd.with_lora(tmp_path / "sdxl.safetensors")
    flux = dict(tensors,
                **{"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 8), np.float32)})
    save_file(flux, str(tmp_path / "flux.safetensors"))
    with pytest.raises(CheckpointError, match="LoRA for Flux"):
        sd.with_lora(tmp_path / "flux.safetensors")
    odd = dict(tensors, **{"unet.some.thing.weight": np.zeros(3, np.float32)})
    save_file(odd, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match=r"(?s)1 key\(s\) fit no LoRA layout.*unet.some.thing.weight"):
        sd.with_lora(tmp_path / "odd.safetensors")
    elsewhere = {k.replace("down_blocks.0", "down_blocks.7"): v for k, v in tensors.items()}
    save_file(elsewhere, str(tmp_path / "elsewhere.safetensors"))
    with pytest.raises(CheckpointError, match="(?s)layers the model does not have.*down_blocks.7"):
        sd.with_lora(tmp_path / "elsewhere.safetensors")
    wide = {k: (np.concatenate([v, v], axis=1) if k.endswith("lora_A.weight") and "to_k" in k else v)
            for k, v in tensors.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"))
    with pytest.raises(CheckpointError, match="shape mismatches"):
        sd.with_lora(tmp_path / "wide.safetensors")
    ldm = {"lora_unet_input_blocks_1_7_proj_in.lora_down.weight": np.zeros((2, 32), np.float32),
           "lora_unet_input_blocks_1_7_proj_in.lora_up.weight": np.zeros((32, 2), np.float32)}
    save_file(ldm, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(CheckpointError, match="(?s)layers the model does not have.*input_blocks_1_7"):
        sd.with_lora(tmp_path / "ldm.safetensors")
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        sd.with_lora(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_readme_lora_commands_train_export_and_sample(base, sd, tmp_path):
    """The README's fine-tuning commands (also docs/lora.md's) through the installed console scripts (the
    tiny variant of the config, a tiny base, a small image folder): only the adapters train and are
    checkpointed; two hosts that
    stop and resume train what one does; the export loads in diffusers, which gives the images sdjax
    gives with it; the sampling command applies it."""
    import shlex
    import subprocess
    import sys

    import orbax.checkpoint as ocp
    from PIL import Image

    train_cmd, sample_cmd = readme_block("## Fine-tune on your images")
    assert readme_block("Training one: `sd15_finetune` with", "docs/lora.md") == [train_cmd, sample_cmd]
    write_image_folder(tmp_path / "my_images", 12)
    bin_dir = os.path.dirname(sys.executable)

    def argv(command: str) -> list[str]:
        args = [str(base) if a == "stable-diffusion-v1-5" else a for a in shlex.split(command)]
        args = [a.replace("=stable-diffusion-v1-5", f"={base}") for a in args]
        args[0] = os.path.join(bin_dir, os.path.basename(args[0]))
        return ["sd15_finetune:tiny" if a == "sd15_finetune" else a for a in args]

    env = subprocess_env()
    done = subprocess.run(argv(train_cmd) + [f"--config.data.data_dir={tmp_path / 'tfds'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "step 4/4" in done.stdout + done.stderr

    path = str(tmp_path / "runs" / "lora" / "checkpoints" / "4" / "state")
    ckpt = ocp.PyTreeCheckpointer()
    saved = ckpt.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                          ckpt.metadata(path).item_metadata.tree))
    assert list(saved["params"]) == ["unet_lora"]  # the checkpoint holds the adapters alone
    adapter_bytes = sum(x.nbytes for x in jax.tree.leaves(saved["params"]))
    unet_bytes = sum(np.asarray(x).nbytes for x in jax.tree.leaves(sd.params["unet"]))
    assert adapter_bytes < unet_bytes

    # The same command on two hosts (processes, each with its own HOME and data copy), stopped at
    # step 2 and resumed to 4: the adapters, their Adam moments and EMA of the one uninterrupted host.
    def two_hosts(*extra):
        port = free_port()
        procs = [subprocess.Popen(
            argv(train_cmd) + list(extra), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(env, HOME=str(tmp_path / f"home{i}"), SDJAX_COORDINATOR=f"localhost:{port}",
                     SDJAX_NUM_PROCESSES="2", SDJAX_PROCESS_ID=str(i)))
            for i in range(2)]
        try:
            outs = [p.communicate(timeout=600)[0] for p in procs]
        finally:
            for p in procs:
                p.kill()
        assert [p.returncode for p in procs] == [0, 0], logs_tail(outs)
        return outs

    two_hosts("--config.train.steps=2", "--workdir", "runs/lora2")
    assert "resumed from step 2" in "".join(two_hosts("--workdir", "runs/lora2", "--export", "runs/my-lora2"))
    resumed = ckpt.restore(str(tmp_path / "runs" / "lora2" / "checkpoints" / "4" / "state"),
                           restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                                     ckpt.metadata(path).item_metadata.tree))
    for name in ("params", "ema_params", "opt_state"):
        got, want = (jax.tree_util.tree_flatten_with_path(t[name])[0] for t in (resumed, saved))
        assert [k for k, _ in got] == [k for k, _ in want] and got
        for (k, a), (_, b) in zip(got, want):  # atol: Adam's first moves of near-zero gradients (lr / 10)
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=name + jax.tree_util.keystr(k))

    lora_file = tmp_path / "runs" / "my-lora" / "pytorch_lora_weights.safetensors"
    ups = [v for k, v in load_file(str(lora_file)).items() if k.endswith("lora_B.weight")]
    assert ups and all(np.abs(u).max() > 0 for u in ups)  # trained away from PEFT's zero start
    noise = _noise(sd)
    ours = sd.with_lora(lora_file).txt2img(PROMPTS, steps=STEPS, guidance_scale=SCALE, height=SIZE, width=SIZE,
                                           init_latents=noise, output="float")
    assert np.abs(ours - _diffusers_images(base, lora_file, 1.0, noise)).mean() <= 3e-4

    args = argv(sample_cmd) + ["--steps", "3", "--H", str(SIZE), "--W", str(SIZE), "--n-samples", "2"]
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    png = sorted((tmp_path / "outputs").glob("0*.png"))[0]
    meta = json.loads(png.with_suffix(".json").read_text())
    assert meta["loras"] == [[str(lora_file), 0.8]]
    want = sd.with_lora(lora_file, 0.8).txt2img([meta["prompt"]] * 2, steps=3, height=SIZE, width=SIZE,
                                                seed=meta["seed"])
    assert np.abs(np.asarray(Image.open(png)).astype(int) - want[0]).max() <= 1
    bad = subprocess.run(args[:1] + ["--checkpoint", str(base), "--prompt", "x", "--lora", "nope.safetensors:0.5"],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "--lora nope.safetensors: no such file" in bad.stderr


def test_lora_files_round_trip_in_both_layouts(sd, peft_lora, tmp_path):
    from sdjax import lora
    from sdjax.checkpoints import lora as lora_files
    from sdjax.checkpoints.formats import LORA_LAYOUTS

    params = sd.params
    adapters = lora_files.read(peft_lora)
    want = lora.merge(params, adapters)
    for layout in LORA_LAYOUTS:
        back = lora_files.read(lora_files.save(tmp_path / layout, adapters, layout))
        assert len(back) == len(adapters)
        for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(lora.merge(params, back))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_lora_state_at_sd15_shapes_is_the_adapters_alone(tmp_path):
    """The AOT report's state sizes for SD 1.5 (shapes only, nothing allocated): rank-16 adapters on
    every transformer's q/k/v/out, proj_in/out and feed-forward against the full fine-tune."""
    from sdjax import aot, configs as configs_lib, sources
    from sdjax.training import latent
    from sdjax.training.schema import LatentRunConfig

    sizes = {}
    for rank in (0, 16):
        config = configs_lib.load(configs_lib.resolve("sd15_finetune"))
        config.lora.rank = rank
        run_config = LatentRunConfig.from_config(config)
        run = latent.build(run_config, str(tmp_path), sources=sources.abstract(run_config.model, "sd15"))
        sizes[rank] = aot.state_sizes(run)
    # Closed form: a transformer of width C adapts attn1 q/k/v/out (8C), attn2 q/out (4C) and k/v from the
    # 768-wide text (2 x (768 + C)), GEGLU in (C + 8C) and out (4C + C), proj_in/out (4C): 32C + 1536
    # inputs + outputs per rank. SD 1.5 has 5 transformers at 320, 5 at 640 and 6 at 1280 channels.
    widths = [320] * 5 + [640] * 5 + [1280] * 6
    assert sizes[16]["trained_parameters"] == 16 * sum(32 * c + 1536 for c in widths)
    assert sizes[0]["trained_parameters"] == 859_520_964  # the SD 1.5 UNet
    assert sizes[16]["train_state_gib"] < sizes[0]["train_state_gib"] / 100


def test_dropout_path_equals_the_merged_update_and_is_unbiased(sd):
    """``lora.dropout`` trains adapters beside the frozen layers (PEFT's lora_dropout): at rate 0 that
    path gives the merged path's loss and adapter gradients (under remat); at rate 0.5
    one layer's adapter output averages (over dropout draws) to the undropped one: E[dropout(x)] = x."""
    import flax.linen as nn
    import jax.numpy as jnp

    from sdjax.train_state import RUN_ONCE_COMPILER_OPTIONS
    from sdjax.training import lora, schema

    base = sd.params["unet"]
    targets = lora.find_targets(base, schema.LORA_TARGETS)
    adapters = jax.tree.map(lambda a: a + 0.05, lora.init_adapters(jax.random.key(1), targets, 4))  # up != 0
    c = sd.configs.unet
    x = jax.random.normal(jax.random.key(2), (2, 4, 4, c.in_channels))
    t = jnp.array([10, 500])
    ctx = jax.random.normal(jax.random.key(3), (2, 8, c.cross_attention_dim))

    unet = sd.unet.clone(remat=True)  # the closure over the adapters also holds under jax.checkpoint

    def merged(a):
        return jnp.sum(unet.apply({"params": lora.apply_adapters(base, a, targets, 2.0)}, x, t, ctx) ** 2)

    def beside(a):
        with nn.intercept_methods(lora.dropout_interceptor(a, targets, 2.0, 0.0, jax.random.key(4))):
            return jnp.sum(unet.apply({"params": base}, x, t, ctx) ** 2)

    (got, g_got), (want, g_want) = (jax.jit(jax.value_and_grad(f), compiler_options=RUN_ONCE_COMPILER_OPTIONS)(adapters)
                                        for f in (beside, merged))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for u, v in zip(jax.tree.leaves(g_got), jax.tree.leaves(g_want)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5 * np.abs(v).max())

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, h):
            return nn.Dense(6, name="to_q")(h)

    h = jax.random.normal(jax.random.key(5), (3, 5))
    params = Layer().init(jax.random.key(6), h)["params"]
    target = lora.find_targets(params, ("to_q",))
    a = {target[0].name: {"down": jax.random.normal(jax.random.key(7), (2, 5)),
                          "up": jax.random.normal(jax.random.key(8), (6, 2))}}

    plain = Layer().apply({"params": params}, h)

    def adapter_out(key):
        with nn.intercept_methods(lora.dropout_interceptor(a, target, 1.0, 0.5, key)):
            return Layer().apply({"params": params}, h) - plain

    draws = jax.jit(jax.vmap(adapter_out))(jax.random.split(jax.random.key(9), 20000))
    exact = h @ a[target[0].name]["down"].T @ a[target[0].name]["up"].T
    assert np.abs(np.asarray(draws[0]) - np.asarray(exact)).max() > 0.1  # one draw drops inputs
    sem = np.asarray(draws.std(0)) / np.sqrt(draws.shape[0])
    assert np.all(np.abs(np.asarray(draws.mean(0)) - np.asarray(exact)) <= 5 * sem + 1e-6)
    with pytest.raises(ValueError, match="lora.dropout must be in"):
        schema.LoraConfig(rank=4, dropout=1.0)
    with pytest.raises(ValueError, match="wider convolutions"):
        lora.check_dropout_targets(lora.find_targets(base, ("conv1",)))


def test_dropout_path_on_the_flash_attention_layout():
    """The TPU flash path's projections are heads-major (``HeadsDense``, ``HeadsMergeDense``): the
    adapters beside them give the merged path's output (TPU interpreter, rate 0)."""
    import functools

    import flax.linen as nn
    import jax.experimental.pallas.tpu as pltpu

    from sdjax.models import layers
    from sdjax.training import lora

    x = np.random.default_rng(6).normal(size=(1, layers.FLASH_MIN_TOKENS, 80)).astype(np.float32)
    attn = layers.Attention(2, 40, 80, implementation="flash")
    params = layers.unbox(attn.clone(implementation="xla").init(jax.random.key(0), x))["params"]  # the same tree
    targets = lora.find_targets(params, ("to_q", "to_k", "to_v", "to_out.0"))
    adapters = jax.tree.map(lambda a: a + 0.05, lora.init_adapters(jax.random.key(1), targets, 4))

    def beside():
        with nn.intercept_methods(lora.dropout_interceptor(adapters, targets, 2.0, 0.0, jax.random.key(2))):
            return attn.apply({"params": params}, x)

    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(beside)()
        want = jax.jit(functools.partial(attn.apply,
                                         {"params": lora.apply_adapters(params, adapters, targets, 2.0)}))(x)
        plain = jax.jit(attn.apply)({"params": params}, x)
    assert np.abs(np.asarray(want) - np.asarray(plain)).max() > 0.01  # the adapters change the output
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
