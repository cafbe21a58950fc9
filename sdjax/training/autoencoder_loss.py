"""The perceptual KL autoencoder's loss, as CompVis' ``LPIPSWithDiscriminator``.

Generator (autoencoder + a learned scalar ``logvar``)::

    rec   = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)          per pixel
    nll   = sum(rec / exp(logvar) + logvar) / B
    loss  = nll + kl_weight * sum(KL) / B + d_weight * disc_factor * g_loss,   g_loss = -mean(D(x_rec))
    d_weight = disc_weight * clip(|grad_W nll| / (|grad_W g_loss| + 1e-4), 0, 1e4), detached,

W the decoder's ``conv_out`` kernel; ``disc_factor`` is 0 before ``disc_start``, and the GAN terms
(adaptive weight, discriminator loss and gradients) are then skipped, not computed and zeroed. The
PatchGAN discriminator minimises ``disc_factor * hinge(D(x), D(x_rec))``.

Unlike the original, which runs the autoencoder again after its update before the
discriminator's turn, the discriminator sees this step's (pre-update) reconstructions: one
autoencoder forward per step instead of two.
"""

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from sdjax.models.autoencoder import AutoencoderKL
from sdjax.models.discriminator import NLayerDiscriminator
from sdjax.models.lpips import LPIPS
from sdjax.training.schema import LossConfig

ADAPTIVE_WEIGHT_EPS = 1e-4
ADAPTIVE_WEIGHT_MAX = 1e4


@dataclasses.dataclass(frozen=True)
class Networks:
    """The modules the loss runs (static, hashable)."""
    vae: AutoencoderKL
    discriminator: NLayerDiscriminator
    lpips: LPIPS | None  # None: perceptual term off


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adopt_weight(weight: float, step: jax.Array, threshold: int) -> jax.Array:
    """``weight`` from step ``threshold`` on, 0 before (taming's ``adopt_weight``)."""
    return jnp.where(step >= threshold, weight, 0.0).astype(jnp.float32)


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """disc_weight * clip(|nll_grad| / (|g_grad| + 1e-4), 0, 1e4), detached."""
    ratio = jnp.linalg.norm(nll_grad.ravel()) / (jnp.linalg.norm(g_grad.ravel()) + ADAPTIVE_WEIGHT_EPS)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, ADAPTIVE_WEIGHT_MAX)) * disc_weight


def last_layer(vae_params: Any) -> jax.Array:
    """The decoder's output conv kernel, the layer the adaptive weight balances on."""
    return vae_params["decoder"]["conv_out"]["kernel"]


def generator_losses(gen_params: dict, disc_params: Any, lpips_params: Any, images: jax.Array, key: jax.Array,
                     nets: Networks, loss: LossConfig
                     ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]:
    """((nll_loss, kl_loss, g_loss), aux) for ``gen_params = {"autoencoder", "logvar"}``."""
    vae_vars = {"params": gen_params["autoencoder"]}
    posterior = nets.vae.apply(vae_vars, images, method=AutoencoderKL.encode)
    rec = nets.vae.apply(vae_vars, posterior.sample(key), method=AutoencoderKL.decode).astype(jnp.float32)
    B = images.shape[0]
    rec_loss = jnp.abs(images - rec)
    p_loss = jnp.zeros((B,), jnp.float32)
    if nets.lpips is not None:
        p_loss = nets.lpips.apply({"params": lpips_params}, images, rec)
        rec_loss = rec_loss + loss.perceptual_weight * p_loss[:, None, None, None]
    logvar = gen_params["logvar"]
    nll_loss = jnp.sum(rec_loss / jnp.exp(logvar) + logvar) / B
    kl_loss = jnp.sum(posterior.kl()) / B
    g_loss = -jnp.mean(nets.discriminator.apply({"params": disc_params}, rec))
    aux = {"reconstructions": rec, "rec_loss": jnp.mean(jnp.abs(images - rec)), "p_loss": jnp.mean(p_loss)}
    return (nll_loss, kl_loss, g_loss), aux


def loss_and_grads(params: dict[str, Any], lpips_params: Any, images: jax.Array, key: jax.Array, step: jax.Array,
                   nets: Networks, loss: LossConfig) -> tuple[dict[str, Any], dict[str, jax.Array]]:
    """(gradients of ``params = {"autoencoder", "logvar", "discriminator"}``, metrics) for one batch:
    the generator's gradients of its total loss, the discriminator's of its hinge loss."""
    gen_params = {"autoencoder": params["autoencoder"], "logvar": params["logvar"]}
    fwd = functools.partial(generator_losses, disc_params=params["discriminator"], lpips_params=lpips_params,
                            images=images, key=key, nets=nets, loss=loss)
    (nll_loss, kl_loss, g_loss), vjp_fn, aux = jax.vjp(fwd, gen_params, has_aux=True)
    one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
    disc_factor = adopt_weight(loss.disc_factor, step, loss.disc_start)
    fake = jax.lax.stop_gradient(aux["reconstructions"])

    def disc_loss_fn(disc_params):
        # Two calls, not one on the concatenation: BatchNorm normalises each batch on its own.
        real = nets.discriminator.apply({"params": disc_params}, images)
        fake_logits = nets.discriminator.apply({"params": disc_params}, fake)
        return disc_factor * hinge_d_loss(real, fake_logits), (jnp.mean(real), jnp.mean(fake_logits))

    def gan_on():
        # Only the last layer's cotangent is used from these two: XLA prunes the rest of each pass.
        (nll_grads,) = vjp_fn((one, zero, zero))
        (g_grads,) = vjp_fn((zero, zero, one))
        d_weight = adaptive_weight(last_layer(nll_grads["autoencoder"]), last_layer(g_grads["autoencoder"]),
                                   loss.disc_weight)
        (disc_loss, logits), disc_grads = jax.value_and_grad(disc_loss_fn, has_aux=True)(params["discriminator"])
        return d_weight, disc_loss, logits, disc_grads

    def gan_off():
        # Before disc_start every GAN term is multiplied by 0: skip computing them. The
        # discriminator's gradients are then exactly zero, as in the originals.
        return zero, zero, (zero, zero), jax.tree.map(jnp.zeros_like, params["discriminator"])

    d_weight, disc_loss, (logits_real, logits_fake), disc_grads = jax.lax.cond(disc_factor > 0, gan_on, gan_off)
    (gen_grads,) = vjp_fn((one, jnp.float32(loss.kl_weight), d_weight * disc_factor))
    total = nll_loss + loss.kl_weight * kl_loss + d_weight * disc_factor * g_loss
    return dict(gen_grads, discriminator=disc_grads), {
        "loss": total, "nll_loss": nll_loss, "kl_loss": kl_loss, "rec_loss": aux["rec_loss"],
        "p_loss": aux["p_loss"], "g_loss": g_loss, "d_weight": d_weight, "disc_factor": disc_factor,
        "logvar": params["logvar"], "disc_loss": disc_loss, "logits_real": logits_real, "logits_fake": logits_fake,
    }
