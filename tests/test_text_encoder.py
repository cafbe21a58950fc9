"""CLIP text encoder against transformers' CLIPTextModel (tiny, random, f32)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

from sdjax.models import layers
from sdjax.checkpoints.convert import text_encoder_from_torch, text_encoder_to_torch
from sdjax.models.text_encoder import CLIPTextEncoder, TextEncoderConfig, pooled_output

TINY = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_attention_heads=4,
            max_position_embeddings=77, bos_token_id=998, eos_token_id=999, pad_token_id=999)


def random_torch_model(**kw) -> CLIPTextModel:
    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TINY, **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():  # LayerNorm scales and all biases too
            p.add_(0.1 * torch.randn_like(p))
    return model


def token_ids(batch: int = 2, length: int = 77) -> np.ndarray:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 998, (batch, length))
    ids[:, 0] = 998
    ids[0, 9:] = 999
    ids[1, 40:] = 999
    return ids


def count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_sd1_last_layer_matches_transformers():
    torch_model = random_torch_model(num_hidden_layers=3, hidden_act="quick_gelu")
    config = TextEncoderConfig.from_transformers_config(torch_model.config.to_dict())
    assert config.output_layer == "last" and config.num_hidden_layers == 3 and config.hidden_act == "quick_gelu"
    # On-disk checkpoints carry the "text_model." prefix and the position_ids buffer.
    sd = {f"text_model.{k}": v.numpy() for k, v in torch_model.state_dict().items()}
    sd["text_model.embeddings.position_ids"] = np.arange(77)[None]
    params = text_encoder_from_torch(sd, config)
    ids = token_ids()
    with torch.no_grad():
        out = torch_model(torch.from_numpy(ids))
    hidden = CLIPTextEncoder(config).apply({"params": params}, jnp.asarray(ids, jnp.int32)).context_BLD
    np.testing.assert_allclose(hidden, out.last_hidden_state.numpy(), atol=1e-4, rtol=0)
    pooled = pooled_output(hidden, jnp.asarray(ids), config.eos_token_id)
    np.testing.assert_allclose(pooled, out.pooler_output.numpy(), atol=1e-4, rtol=0)
    # clip_skip as diffusers' StableDiffusionPipeline reads it: hidden_states[-(clip_skip + 1)] through
    # the final LayerNorm; the pooled output stays the last layer's.
    with torch.no_grad():
        states = torch_model(torch.from_numpy(ids), output_hidden_states=True).hidden_states
        want = torch_model.final_layer_norm(states[-3]).numpy()
    got = CLIPTextEncoder(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), 2)
    np.testing.assert_allclose(got.context_BLD, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.pooled_BP, out.pooler_output.numpy(), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match=r"clip_skip must be an int in \[0, 3\]"):
        CLIPTextEncoder(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), 4)


def test_sd2_penultimate_layer_matches_transformers():
    torch_model = random_torch_model(num_hidden_layers=4, hidden_act="gelu")
    config = TextEncoderConfig.from_transformers_config(torch_model.config.to_dict(), output_layer="penultimate")
    params = text_encoder_from_torch(torch_model.state_dict(), config)
    assert set(params["encoder"]) == {"layers_0", "layers_1", "layers_2"}
    ids = token_ids()
    with torch.no_grad():
        out = torch_model(torch.from_numpy(ids), output_hidden_states=True)
        want = torch_model.final_layer_norm(out.hidden_states[-2]).numpy()
    hidden = jax.jit(CLIPTextEncoder(config).apply)({"params": params}, jnp.asarray(ids, jnp.int32)).context_BLD
    np.testing.assert_allclose(hidden, want, atol=1e-4, rtol=0)
    # diffusers' SD 2 form (one layer fewer, last hidden state) is the same network.
    diffusers_form = TextEncoderConfig.from_transformers_config(config.to_transformers_config())
    assert diffusers_form.num_hidden_layers == 3 and diffusers_form.output_layer == "last"
    sd23 = {k: v for k, v in torch_model.state_dict().items() if not k.startswith("encoder.layers.3.")}
    assert jax.tree.all(jax.tree.map(np.array_equal, params, text_encoder_from_torch(sd23, diffusers_form)))


def test_no_layers_matches_transformers_and_ignores_the_other_words():
    """num_hidden_layers=0 (configs/tiny.py): embeddings through the final LayerNorm, as transformers computes it."""
    torch_model = random_torch_model(num_hidden_layers=0, hidden_act="gelu")
    config = TextEncoderConfig.from_transformers_config(torch_model.config.to_dict())
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = text_encoder_from_torch(sd, config)
    ids = token_ids()
    with torch.no_grad():
        want = torch_model(torch.from_numpy(ids)).last_hidden_state.numpy()
    hidden = CLIPTextEncoder(config).apply({"params": params}, jnp.asarray(ids, jnp.int32)).context_BLD
    np.testing.assert_allclose(hidden, want, atol=1e-5, rtol=0)
    back = {k.removeprefix("text_model."): v for k, v in text_encoder_to_torch(params).items()}
    assert set(back) == set(sd) - {"embeddings.position_ids"}
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k])
    # A token's output depends on its word and position only: change every other word, it stays.
    other = ids.copy()
    other[:, 1:5] = (ids[:, 1:5] + 7) % 998
    changed = CLIPTextEncoder(config).apply({"params": params}, jnp.asarray(other, jnp.int32)).context_BLD
    np.testing.assert_array_equal(np.asarray(changed)[:, 5:], np.asarray(hidden)[:, 5:])
    with pytest.raises(ValueError, match="penultimate.*at least 1 layer"):
        TextEncoderConfig(**TINY, num_hidden_layers=0, output_layer="penultimate")


def test_config_round_trips_through_transformers():
    config = TextEncoderConfig(**TINY, num_hidden_layers=2, hidden_act="gelu")
    d = config.to_transformers_config()
    assert CLIPTextConfig(**d).num_hidden_layers == 2
    assert TextEncoderConfig.from_transformers_config(d) == config
    with pytest.raises(ValueError, match="hidden_act"):
        TextEncoderConfig(hidden_act="relu")


@pytest.mark.parametrize("kw, expected", [
    (dict(), 123_060_480),  # OpenAI CLIP ViT-L/14 text tower (SD 1.x)
    (dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
          num_hidden_layers=23), 340_387_840),  # OpenCLIP ViT-H/14 as diffusers stores it for SD 2.x
    (dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, hidden_act="gelu",
          num_hidden_layers=24, output_layer="penultimate"), 340_387_840),  # the same, OpenCLIP's form
])
def test_param_counts_match_the_published_text_towers(kw, expected):
    model = CLIPTextEncoder(TextEncoderConfig(**kw))
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
    assert count(shapes["params"]) == expected


def test_bf16_compute_with_f32_params():
    torch_model = random_torch_model(num_hidden_layers=2, hidden_act="quick_gelu")
    config = TextEncoderConfig.from_transformers_config(torch_model.config.to_dict())
    params = text_encoder_from_torch(torch_model.state_dict(), config)
    ids = token_ids()
    model = CLIPTextEncoder(config, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), jnp.asarray(ids, jnp.int32))["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(layers.unbox(boxed)))
    hidden = model.apply({"params": params}, jnp.asarray(ids, jnp.int32)).context_BLD
    assert hidden.dtype == jnp.bfloat16
    with torch.no_grad():
        want = torch_model(torch.from_numpy(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(hidden, np.float32), want, atol=0.1, rtol=0)


def test_sdxl_encoders_give_the_penultimate_hidden_state_and_the_projected_pooled_output():
    """SDXL's conditioning from each encoder: diffusers' ``hidden_states[-2]`` (no final LayerNorm) and,
    from ``CLIPTextModelWithProjection``, ``text_embeds`` (the pooled output through text_projection)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    torch_model = CLIPTextModelWithProjection(CLIPTextConfig(**TINY, num_hidden_layers=3, hidden_act="gelu",
                                                             projection_dim=24)).eval()
    with torch.no_grad():
        for p in torch_model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    d = dict(torch_model.config.to_dict(), architectures=["CLIPTextModelWithProjection"])
    config = TextEncoderConfig.from_transformers_config(d, output_layer="penultimate_hidden")
    assert config.with_projection and config.num_layers_used == 3
    sd = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    params = text_encoder_from_torch(sd, config)
    ids = token_ids()
    with torch.no_grad():
        out = torch_model(torch.from_numpy(ids), output_hidden_states=True)
    got = jax.jit(CLIPTextEncoder(config).apply)({"params": params}, jnp.asarray(ids, jnp.int32))
    np.testing.assert_allclose(got.context_BLD, out.hidden_states[-2].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(got.pooled_BP, out.text_embeds.numpy(), atol=1e-4, rtol=0)
    assert got.pooled_BP.shape == (2, 24)
    # clip_skip as diffusers' SDXL pipelines read it: hidden_states[-(clip_skip + 2)], no LayerNorm.
    skipped = CLIPTextEncoder(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), 1)
    np.testing.assert_allclose(skipped.context_BLD, out.hidden_states[-3].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(skipped.pooled_BP, out.text_embeds.numpy(), atol=1e-4, rtol=0)
    # The export writes transformers' names back, text_projection beside text_model, and its config
    # builds the same class.
    back = text_encoder_to_torch(params)
    assert set(back) == set(sd) - {"text_model.embeddings.position_ids"}
    assert TextEncoderConfig.from_transformers_config(config.to_transformers_config(),
                                                      output_layer="penultimate_hidden") == config


def test_sdxl_text_tower_param_counts():
    """CLIP ViT-L (SDXL's text_encoder, all 12 layers) and OpenCLIP ViT-bigG with its projection
    (text_encoder_2): 123,060,480 and 694,659,840 parameters, as transformers counts them."""
    big_g = dict(hidden_size=1280, num_attention_heads=20, intermediate_size=5120, hidden_act="gelu",
                 num_hidden_layers=32, projection_dim=1280, with_projection=True, output_layer="penultimate_hidden")
    for kw, expected in ((dict(output_layer="penultimate_hidden"), 123_060_480), (big_g, 694_659_840)):
        model = CLIPTextEncoder(TextEncoderConfig(**kw))
        shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 77), jnp.int32))
        assert count(shapes["params"]) == expected
