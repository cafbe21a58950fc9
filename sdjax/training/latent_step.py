"""The latent-diffusion train step: a pure function of the state, a global batch and the frozen arrays.

The loss draws caption dropout, the latent sample, timesteps and noise from
``fold_in(state.key, state.step)``, so a resumed run repeats an uninterrupted one; with
``grad_accum`` = A the batch is split into A interleaved micro-batches whose gradients are
averaged in a scan. ``builder.compile_step`` jits it on a mesh. The text is encoded as sampling
encodes it (``generate.encode_text``): SDXL's two encoders, their pooled embedding and the
micro-conditioning numbers of each example (original size, crop offset, target size) reach its UNet.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sdjax import generate
from sdjax.diffusion.schedule import add_noise, get_target
from sdjax.models.autoencoder import AutoencoderKL, DiagonalGaussian
from sdjax.models.text_encoder import CLIPTextEncoder
from sdjax.models.unet import AddedCond, UNet
from sdjax.train_state import TrainState
from sdjax.training import lora


@dataclasses.dataclass(frozen=True)
class LatentStep:
    """What the step needs besides arrays: the modules and the static settings (hashable)."""
    unet: UNet
    vae: AutoencoderKL
    text_encoder: CLIPTextEncoder
    train_text_encoder: bool
    prediction_type: str
    num_train_timesteps: int
    caption_dropout: float
    min_snr_gamma: float | None
    grad_accum: int
    ema_decay: float
    lora_targets: tuple[lora.Target, ...] = ()  # non-empty: the UNet is frozen and these layers' adapters train
    # (targets of the text encoders too with lora.text_encoders; those encoders stay frozen beneath them)
    lora_scale: float = 1.0  # alpha / rank
    lora_dropout: float = 0.0  # > 0: adapters beside the frozen layers, dropout on their inputs
    text_encoder_2: CLIPTextEncoder | None = None  # SDXL's second (frozen) text encoder

    @property
    def nets(self) -> generate.Networks:
        return generate.Networks(self.unet, self.vae, self.text_encoder, self.text_encoder_2)

    @property
    def sdxl(self) -> bool:
        """The UNet reads added conditioning: a pooled text embedding and micro-conditioning numbers."""
        return bool(self.unet.config.addition_embed_type)


def min_snr_weight(snr_B: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for an epsilon or v-prediction loss."""
    clipped = jnp.minimum(snr_B, gamma)
    return clipped / (snr_B + 1.0) if prediction_type == "v_prediction" else clipped / snr_B


def posterior(vae: AutoencoderKL, vae_params: Any, batch: dict[str, jax.Array]) -> DiagonalGaussian:
    """The latent posterior of a batch of images, or of cached moments (``train.cache_latents``)."""
    if "moments" in batch:
        return DiagonalGaussian.from_moments(batch["moments"])
    return vae.apply({"params": vae_params}, batch["image"], method=AutoencoderKL.encode)


def unet_params(trained: dict[str, Any], frozen: dict[str, Any], step: LatentStep) -> Any:
    """The UNet's weights: trained, or (LoRA) the frozen base with the trained adapters merged in."""
    if not step.lora_targets:
        return trained["unet"]
    return lora.apply_adapters(frozen["unet"], trained["unet_lora"], lora.of_network(step.lora_targets, "unet"),
                               step.lora_scale)


def text_encoder_params(trained: dict[str, Any], frozen: dict[str, Any], step: LatentStep) -> dict[str, Any]:
    """Each text encoder's weights: trained (SD from scratch), frozen, or frozen with trained adapters merged in."""
    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        targets = lora.of_network(step.lora_targets, name)
        if getattr(step, name) is None:
            continue
        if step.train_text_encoder and name == "text_encoder":
            out[name] = trained[name]
        elif targets:
            out[name] = lora.apply_adapters(frozen[name], trained[lora.params_key(name)], targets, step.lora_scale)
        else:
            out[name] = frozen[name]
    return out


def conditioning(params: Any, frozen: dict, micro: dict, drop_B: jax.Array, image_hw: tuple[int, int],
                 step: LatentStep) -> tuple[jax.Array, AddedCond | None]:
    """The UNet's text context of a micro-batch and, for SDXL, its added conditioning. A dropped
    caption (``drop_B``) reads the empty caption's context (SD 1/2), or zeros for the context and the
    pooled embedding (SDXL, as its training dropped them and as its pipelines' zero negative
    conditioning reads). SDXL's micro-conditioning: each example's original (height, width) and crop
    (top, left), then the trained images' (height, width) ``image_hw``."""
    text_params = text_encoder_params(params, frozen, step)
    B = drop_B.shape[0]
    if not step.sdxl:
        if "text_embeds" in micro:  # cached (train.cache_text): the empty caption encoded here, once per step
            empty = generate.encode_text(step.nets, text_params, frozen["empty_ids"][None], None)[0]
            return jnp.where(drop_B[:, None, None], empty, micro["text_embeds"].astype(empty.dtype)), None
        ids = jnp.where(drop_B[:, None], frozen["empty_ids"][None], micro["input_ids"])
        return generate.encode_text(step.nets, text_params, ids, None)[0], None
    if "text_embeds" in micro:
        ctx, pooled = (micro[k].astype(step.unet.dtype) for k in ("text_embeds", "pooled_embeds"))
    else:
        ctx, pooled = generate.encode_text(step.nets, text_params, micro["input_ids"], micro["input_ids_2"])
    keep_B = 1.0 - drop_B.astype(jnp.float32)
    target = jnp.broadcast_to(jnp.asarray(image_hw, jnp.float32), (B, 2))
    time_ids = jnp.concatenate([micro["original_size"].astype(jnp.float32),
                                micro["crop_top_left"].astype(jnp.float32), target], axis=-1)
    return ((ctx * keep_B[:, None, None]).astype(ctx.dtype),
            AddedCond((pooled * keep_B[:, None]).astype(pooled.dtype), time_ids))


def micro_loss(params: Any, frozen: dict, micro: dict, key: jax.Array, latent_scale: jax.Array,
               step: LatentStep) -> jax.Array:
    """The mean (min-SNR weighted) denoising loss of one micro-batch."""
    k_drop, k_vae, k_t, k_noise = jax.random.split(key, 4)
    B = micro["image" if "image" in micro else "moments"].shape[0]
    drop_B = jax.random.bernoulli(k_drop, step.caption_dropout, (B,))
    z = jax.lax.stop_gradient(posterior(step.vae, frozen["vae"], micro).sample(k_vae) * latent_scale)
    f = step.vae.config.downsample_factor
    ctx, added = conditioning(params, frozen, micro, drop_B, (z.shape[1] * f, z.shape[2] * f), step)
    t_B = jax.random.randint(k_t, (B,), 0, step.num_train_timesteps)
    noise = jax.random.normal(k_noise, z.shape, jnp.float32)
    ac = frozen["alphas_cumprod"]
    x_t = add_noise(ac, z, noise, t_B)
    if step.lora_dropout:
        interceptor = lora.dropout_interceptor(params["unet_lora"], lora.of_network(step.lora_targets, "unet"),
                                               step.lora_scale, step.lora_dropout, jax.random.split(key, 5)[4])
        with nn.intercept_methods(interceptor):
            out = step.unet.apply({"params": frozen["unet"]}, x_t.astype(step.unet.dtype), t_B, ctx, added)
    else:
        out = step.unet.apply({"params": unet_params(params, frozen, step)}, x_t.astype(step.unet.dtype), t_B, ctx,
                              added)
    target = get_target(ac, z, noise, t_B, step.prediction_type)
    err_B = jnp.mean(jnp.square(out.astype(jnp.float32) - target), axis=(1, 2, 3))
    if step.min_snr_gamma:
        a = ac[t_B]
        err_B = err_B * min_snr_weight(a / (1.0 - a), step.min_snr_gamma, step.prediction_type)
    return jnp.mean(err_B)


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: dict[str, Any], *,
               step: LatentStep) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on a global batch {"image" (B,H,W,3), "input_ids" (B,L)} (SDXL: and
    "input_ids_2" (B,L), "original_size" and "crop_top_left" (B,2)); with ``train.cache_latents`` the
    images are replaced by cached posterior "moments" (B,h,w,2C), and with ``train.cache_text`` the
    ids by the text encoders' cached outputs "text_embeds" (B,L,D) (SDXL: and "pooled_embeds" (B,P)).
    Each micro-batch of ``grad_accum`` is spread over every data-parallel device."""
    key = state.step_key()
    scale = state.extra["latent_scale"]
    grad_fn = jax.value_and_grad(micro_loss)
    if step.grad_accum == 1:
        loss, grads = grad_fn(state.params, frozen, batch, key, scale, step)
    else:
        A = step.grad_accum

        def split(x):
            x = x.reshape((x.shape[0] // A, A) + x.shape[1:]).swapaxes(0, 1)
            return nn.with_logical_constraint(x, (None, "batch") + (None,) * (x.ndim - 2))

        micro = jax.tree.map(split, batch)

        def body(acc, i):
            loss_i, grads_i = grad_fn(state.params, frozen, jax.tree.map(lambda x: x[i], micro),
                                      jax.random.fold_in(key, i), scale, step)
            return jax.tree.map(jnp.add, acc, (loss_i, grads_i)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
        (loss, grads), _ = jax.lax.scan(body, zeros, jnp.arange(A))
        loss, grads = jax.tree.map(lambda x: x / A, (loss, grads))
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    return state.apply_gradients(grads, step.ema_decay), {"loss": loss, "grad_norm": grad_norm}
