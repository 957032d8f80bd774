"""Data augmentation inside the train step: random crops and horizontal flips (pure JAX).

Recipe step served: 'regularise: data augmentation' (off by default: 'Simplify: no augmentation
yet').
"""

import numpy as np

from jrecipe.data.dataset import int_field
from jrecipe.errors import UserError
from jrecipe.sections import complete


CROP_MODES = ("reflect", "constant", "edge")


def augment(x, rng, aug_config):
  """Random crops and horizontal flips of an image batch; pure JAX, inside the train step.

  Recipe: 'regularise: data augmentation'. Both are OFF by default. Deterministic given `rng`.
  Only image batches [B, H, W, C] are changed: anything else (sequences, vectors) is returned
  as is. `aug_config` is read at trace time; to jit it on its own close over it:
  `jax.jit(functools.partial(augment, aug_config=cfg))`.

  Args:
    x: [B, H, W, C] float inputs (already normalised).
    rng: a jax PRNG key.
    aug_config: the config.data.augment section (a ConfigDict; a dict or None works too, its
      missing fields taking the base config's defaults) with
      random_crop: int pad pixels, 0 = off: pad each image by this many pixels on every side
        and crop back to H x W at an offset drawn per example (a shift of up to +-pad).
      hflip: bool: mirror each example left-right with probability 0.5.
      crop_mode: padding 'reflect' (default), 'constant' (zeros: the training mean after
        normalisation) or 'edge'.

  Returns:
    The augmented batch, same shape and dtype.
  """
  import jax
  import jax.numpy as jnp
  cfg = complete(aug_config, "data.augment")
  pad = int_field(cfg.random_crop, "random_crop")
  hflip = cfg.hflip
  if not isinstance(hflip, (bool, np.bool_)):
    raise UserError(f"augment.hflip={hflip!r} must be true or false.")
  if getattr(x, "ndim", 0) != 4 or (pad == 0 and not hflip):
    return x
  b, h, w, c = x.shape
  crop_rng, flip_rng = jax.random.split(rng)
  if pad:
    mode = cfg.crop_mode
    if mode not in CROP_MODES:
      raise UserError(f"augment.crop_mode={mode!r} is invalid. Valid: {', '.join(CROP_MODES)}.")
    if mode == "reflect" and pad >= min(h, w):
      raise UserError(
          f"augment.random_crop={pad} is too large for {h}x{w} images with reflection padding: "
          f"use at most {min(h, w) - 1}.")
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    offsets = jax.random.randint(crop_rng, (b, 2), 0, 2 * pad + 1)
    crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    x = jax.vmap(crop)(padded, offsets)
  if hflip:
    flip = jax.random.bernoulli(flip_rng, 0.5, (b,))
    x = jnp.where(flip[:, None, None, None], x[:, :, ::-1, :], x)
  return x
