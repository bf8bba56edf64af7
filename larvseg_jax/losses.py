"""Segmentation and image-level losses at 1/2 input resolution (SPEC 2.1-2.3): arrays in, scalars out.

Labels use the source's local class ids with IGNORE = -1 everywhere.
"""

import jax
import jax.numpy as jnp

from larvseg_jax import interp


def loss_grid_inputs(
    logits: jax.Array, labels: jax.Array, rate: int
) -> tuple[jax.Array, jax.Array]:
    """Bilinearly upsamples logits to the loss grid and stride-samples the labels (SPEC 2.1).

    Args:
      logits: [B, h, w, N] at the feature resolution.
      labels: [B, H_in, W_in] int.
      rate: loss grid = input / rate (2 in every LarvSeg config).

    Returns:
      logits [B, H, W, N] and labels [B, H, W] with H = H_in / rate (PyTorch "nearest" = [::rate]).
    """
    labels = interp.downsample_labels(labels, rate)
    logits = interp.resize_bilinear(logits, labels.shape[1:3])
    return logits, labels


def present_classes(labels: jax.Array, num_classes: int) -> jax.Array:
    """[B, H, W] labels -> [B, N] bool: which classes occur in each image (ignore excluded)."""
    flat = labels.reshape(labels.shape[0], -1)
    flat = jnp.where(flat >= 0, flat, num_classes)  # ignore -> out of range, dropped below

    def one(row):
        return jnp.zeros((num_classes,), bool).at[row].set(True, mode="drop")

    return jax.vmap(one)(flat)


def seg_ce(
    logits: jax.Array,
    labels: jax.Array,
    *,
    normalize: str = "all_pixels",
    class_mask: jax.Array | None = None,
) -> jax.Array:
    """Pixel cross-entropy over the current vocabulary (SPEC 2.2).

    Args:
      logits: [B, H, W, N] at the loss grid.
      labels: [B, H, W] int, IGNORE = -1.
      normalize: "all_pixels" divides by B*H*W including ignored pixels (official mmseg-0.17,
        SPEC B10); "valid_pixels" divides by the number of labelled pixels.
      class_mask: [N] bool, False for padding columns of a sampled vocabulary (SPEC 2.6).
    """
    valid = labels >= 0
    if class_mask is not None:
        logits = jnp.where(class_mask, logits, -jnp.inf)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    total = jnp.sum(jnp.where(valid, log_z - picked, 0.0))
    if normalize == "all_pixels":
        return total / labels.size
    if normalize == "valid_pixels":
        return total / jnp.maximum(jnp.sum(valid), 1)
    raise ValueError(
        f"loss.seg_normalize must be 'all_pixels' or 'valid_pixels', got {normalize!r}"
    )


def kept_class_ce(
    pooled: jax.Array, present: jax.Array, class_mask: jax.Array | None = None
) -> jax.Array:
    """CE of every present class l against {l} plus the classes absent from the image (SPEC 2.3).

    Removing the other present classes from the softmax is gradient-identical to deleting their
    columns. logsumexp over the kept set = log(sum_absent exp(z) + exp(z_l)), so all pairs of an
    image cost O(N) instead of O(N^2).

    Args:
      pooled: [..., N] pooled logits of one image (or of one image-label pair's attention pool).
      present: [..., N] bool present classes of that image.
      class_mask: [N] bool, False for padding columns (never in any softmax).

    Returns:
      [..., N] the CE of the pair (image, l) at position l; 0 where l is not present.
    """
    usable = jnp.ones_like(present) if class_mask is None else class_mask & jnp.ones_like(present)
    pooled = jnp.where(usable, pooled, 0.0)
    shift = jax.lax.stop_gradient(jnp.max(jnp.where(usable, pooled, -jnp.inf), -1, keepdims=True))
    e = jnp.exp(pooled - shift)
    absent_sum = jnp.sum(jnp.where(present | ~usable, 0.0, e), axis=-1, keepdims=True)
    ce = jnp.log(absent_sum + e) + shift - pooled
    return jnp.where(present, ce, 0.0)


def image_level_ce(
    logits: jax.Array, labels: jax.Array, class_mask: jax.Array | None = None
) -> tuple[jax.Array, dict]:
    """Image-level CE on mean-pooled logits, mean over (image, present label) pairs (SPEC 2.3).

    Args:
      logits: [B, H, W, N] mask-normed logits at the loss grid; pooling runs over every pixel,
        padding and ignored pixels included (faithful).
      labels: [B, H, W] loss-grid labels; their classes are the image-level labels.
      class_mask: [N] bool, False for padding columns of a sampled vocabulary.

    Returns:
      loss (0 when no pair exists) and aux with "pair_ce" [B, N] and "present" [B, N].
    """
    present = present_classes(labels, logits.shape[-1])
    pooled = jnp.mean(logits, axis=(1, 2))  # [B, N]
    pair_ce = kept_class_ce(pooled, present, class_mask)
    num_pairs = jnp.sum(present)
    loss = jnp.sum(pair_ce) / jnp.maximum(num_pairs, 1)
    return loss, {"pair_ce": pair_ce, "present": present, "num_pairs": num_pairs}
