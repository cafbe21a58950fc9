"""Loading real checkpoint formats into ``StableDiffusion`` and matching the PyTorch originals.

Reference: tiny random diffusers/transformers models, saved as a diffusers folder and as an
original single file; sdjax loads them and each network's output must match to 1e-4 (f32).
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from sdjax.checkpoints.errors import CheckpointError
from sdjax.models.configs import ModelConfigs, abstract_params, count_params
from sdjax.stable_diffusion import StableDiffusion
from sdjax import presets
from tests import tiny_models
from tests.single_file_fixtures import write_original
from tests.helpers import nchw, nhwc

TOL = 1e-4


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def saved(request, tmp_path_factory):
    style = request.param
    folder = tiny_models.save_pipeline(tmp_path_factory.mktemp(style) / "pipe", style, seed=1)
    unet, vae, text = tiny_models.build_torch_models(style, seed=1)
    return style, folder, (unet, vae, text)


def _check_networks(sd: StableDiffusion, torch_models, style: str):
    unet, vae, text = torch_models
    rng = np.random.default_rng(0)
    cfg = tiny_models.STYLES[style]
    # text encoder, through the checkpoint's own tokenizer
    ids = sd.tokenize(["a photo of a cat", ""])
    with torch.no_grad():
        ref = text(torch.from_numpy(ids.astype(np.int64))).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(sd.encode_ids(ids)), ref, atol=TOL, rtol=0)
    # unet
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 901])
    ctx = rng.standard_normal((2, 77, cfg["unet"]["cross_attention_dim"])).astype(np.float32)
    with torch.no_grad():
        ref = nhwc(unet(nchw(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample)
    np.testing.assert_allclose(np.asarray(sd.unet_apply(x, t, ctx)), ref, atol=TOL, rtol=0)
    # vae
    img = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        post = vae.encode(nchw(img)).latent_dist
        f = sd.downsample_factor
        z = rng.standard_normal((1, 16 // f, 16 // f, 4)).astype(np.float32)
        dec = nhwc(vae.decode(nchw(z)).sample)
    mean, logvar = sd.vae_encode(img)
    np.testing.assert_allclose(np.asarray(mean), nhwc(post.mean), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), nhwc(post.logvar), atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(sd.vae_decode(z)), dec, atol=TOL, rtol=0)


def test_diffusers_folder_matches_pytorch(saved):
    style, folder, torch_models = saved
    sd = StableDiffusion.from_pretrained(folder)
    assert sd.configs.scheduler.prediction_type == tiny_models.STYLES[style]["prediction_type"]
    _check_networks(sd, torch_models, style)


def test_single_file_matches_pytorch(saved, tmp_path):
    style, folder, torch_models = saved
    unet, vae, text = torch_models
    sf = tiny_models.STYLES[style]["single_file"]
    path = tmp_path / "model.safetensors"
    write_original(str(path), unet.state_dict(), vae.state_dict(), text.state_dict(), version=sf["version"])
    with pytest.raises(ValueError, match="tokenizer"):
        StableDiffusion.from_pretrained(path, single_file_options=sf["options"]).tokenize(["a cat"])
    pred = tiny_models.STYLES[style]["prediction_type"]
    sd = StableDiffusion.from_pretrained(path, tokenizer=str(folder / "tokenizer"), prediction_type=pred,
                                         single_file_options=sf["options"])
    assert sd.configs.scheduler.prediction_type == pred
    _check_networks(sd, torch_models, style)


def test_sdjax_export_round_trip_is_bit_exact(saved, tmp_path):
    style, folder, _ = saved
    sd = StableDiffusion.from_pretrained(folder)
    sd.save_pretrained(tmp_path / "export")
    back = StableDiffusion.from_pretrained(tmp_path / "export")
    assert back.configs == sd.configs
    flat_a = jax_leaves_with_paths(sd.params)
    flat_b = jax_leaves_with_paths(back.params)
    assert flat_a.keys() == flat_b.keys()
    for k in flat_a:
        assert flat_a[k].dtype == flat_b[k].dtype
        np.testing.assert_array_equal(np.asarray(flat_a[k]), np.asarray(flat_b[k]), err_msg=k)
    np.testing.assert_array_equal(back.tokenize(["a cat"]), sd.tokenize(["a cat"]))


def jax_leaves_with_paths(tree):
    from flax import traverse_util
    return traverse_util.flatten_dict(tree, sep="/")


def test_published_parameter_counts():
    sd15 = {k: count_params(v) for k, v in abstract_params(ModelConfigs.from_dicts(presets.sd15())).items()}
    sd21 = {k: count_params(v) for k, v in abstract_params(ModelConfigs.from_dicts(presets.sd21())).items()}
    assert sd15 == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert sd21 == {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}


def test_abstract_params_are_traced_once_per_config_and_each_call_owns_its_tree(monkeypatch):
    from sdjax.configs import tiny
    from sdjax.models import configs as model_configs
    traces = []
    eval_shape = jax.eval_shape
    monkeypatch.setattr(jax, "eval_shape", lambda *a, **k: traces.append(a[0]) or eval_shape(*a, **k))
    model_configs._traced_params.cache_clear()
    dicts = tiny.get_config().model.to_dict()
    first = abstract_params(ModelConfigs.from_dicts(dicts))
    assert len(traces) == 3  # unet, vae, text encoder
    first["unet"].clear()  # the caller's to change: later calls get the whole tree
    second = abstract_params(ModelConfigs.from_dicts(dicts))  # an equal config, new objects: no trace
    assert len(traces) == 3
    want = {k: count_params(v) for k, v in abstract_params(ModelConfigs.from_dicts(dicts)).items()}
    assert {k: count_params(v) for k, v in second.items()} == want and want["unet"] > 0
    half = abstract_params(ModelConfigs.from_dicts(dicts), jnp.bfloat16)  # another dtype: traced again
    assert len(traces) == 6 and {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}


# ---- bad input --------------------------------------------------------------------------------

def test_unknown_path_and_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="diffusers folder"):
        StableDiffusion.from_pretrained(tmp_path / "nope")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="Supported"):
        StableDiffusion.from_pretrained(tmp_path / "weights.npz")
    with pytest.raises(CheckpointError, match="Supported"):
        StableDiffusion.from_pretrained(tmp_path)


def test_truncated_safetensors_is_a_clear_error(saved, tmp_path):
    style, folder, _ = saved
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    w = broken / "unet" / "diffusion_pytorch_model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        StableDiffusion.from_pretrained(broken)
    w.write_bytes(b"\x05\x00garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        StableDiffusion.from_pretrained(broken)


def test_mismatched_config_lists_every_problem(saved, tmp_path):
    style, folder, _ = saved
    import shutil
    broken = tmp_path / "mismatch"
    shutil.copytree(folder, broken)
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["cross_attention_dim"] = cfg["cross_attention_dim"] * 2
    cfg["layers_per_block"] = cfg["layers_per_block"] + 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        StableDiffusion.from_pretrained(broken)
    msg = str(e.value)
    assert "missing from checkpoint" in msg and "shape mismatch" in msg
    assert "attn2" in msg


def test_pickles_need_explicit_opt_in(saved, tmp_path):
    style, folder, (unet, vae, text) = saved
    import shutil
    pk = tmp_path / "pickled"
    shutil.copytree(folder, pk)
    for name, model, stem in (("unet", unet, "diffusion_pytorch_model"), ("vae", vae, "diffusion_pytorch_model"),
                              ("text_encoder", text, "model")):
        os.remove(pk / name / f"{stem}.safetensors")
        torch.save(model.state_dict(), pk / name / ("pytorch_model.bin" if name == "text_encoder" else f"{stem}.bin"))
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        StableDiffusion.from_pretrained(pk)
    sd = StableDiffusion.from_pretrained(pk, allow_pickle=True)
    ref = StableDiffusion.from_pretrained(folder)
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = np.zeros((1, 77, tiny_models.STYLES[style]["unet"]["cross_attention_dim"]), np.float32)
    np.testing.assert_array_equal(np.asarray(sd.unet_apply(x, 5, ctx)), np.asarray(ref.unet_apply(x, 5, ctx)))


def test_bf16_compute_keeps_f32_params(saved):
    style, folder, _ = saved
    sd = StableDiffusion.from_pretrained(folder, dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax_leaves_with_paths(sd.params).values())
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    ctx = sd.encode_prompt(["a cat"])
    out = sd.unet_apply(x, 500, ctx)
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())
    assert sd.vae_decode(np.zeros((1, 4, 4, 4), np.float32)).dtype == jnp.float32


def test_params_command_prints_the_published_counts(capsys):
    from sdjax import params

    params.main(["--preset", "sd15"])  # the README's command
    out = capsys.readouterr().out
    for name, count in (("unet", 859_520_964), ("vae", 83_653_863), ("text_encoder", 123_060_480),
                        ("total", 859_520_964 + 83_653_863 + 123_060_480)):
        assert re.search(rf"^{name}\s+{count:,}$", out, re.M), out
