"""Mixup and cutmix, as timm's ``Mixup`` (``timm/data/mixup.py``) defines them, inside the train step.

The config fields are timm's: ``mixup_alpha``, ``cutmix_alpha``, ``mixup_prob``,
``mixup_switch_prob``, ``mixup_mode`` (``'batch'``: one draw for the batch; ``'pair'``: one per
pair of rows; ``'elem'``: one per row), ``correct_lam``, ``cutmix_minmax``, and
``label_smoothing`` applied to the mixed targets as ``mixup_target`` does. Row ``i`` mixes with
row ``B - 1 - i`` of the *global* batch (timm's ``x.flip(0)``), and the soft targets mix the two
rows' smoothed one-hot labels with the same ``lam``, corrected to the pasted box's area for
cutmix when ``correct_lam``.

Why in the jitted step and not on the host: the batch then crosses to the device as ``uint8``
(a quarter of float32's bytes) and is mixed after the step normalises it, as timm mixes
normalised tensors; the arithmetic is a few elementwise ops on the device, against a float32
copy of every batch and its normalisation per host core in NumPy; and every data source (digits,
TFDS, image folders, synthetic) gets it from one implementation. The draws are keyed on
``(seed, state.step)`` alone (``step_key``), so a resumed run mixes bitwise as the uninterrupted
one, and they are the same under jit and pmap: under pmap the partner rows come from the
mirrored device (``ppermute``) and each device takes its slice of the global draws. On several
devices the partner rows cross between devices once per step (a collective permute of the local
batch, in the compute dtype after normalisation): small beside a ResNet step, not measured here.

``mix`` takes the draws explicitly (``tests/test_mixup.py`` feeds timm's ``Mixup`` the same ones);
``draw`` makes them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

MIXUP_MODES = ("batch", "pair", "elem")
_SALT = 0x6D6978  # keeps the mixing draws apart from other uses of jax.random.key(seed)


@dataclasses.dataclass(frozen=True)
class MixupOptions:
    """The mixing fields of the config (timm's ``Mixup`` arguments), the class count and seed."""

    mixup_alpha: float
    cutmix_alpha: float
    mixup_prob: float
    mixup_switch_prob: float
    mixup_mode: str
    correct_lam: bool
    label_smoothing: float
    num_classes: int
    seed: int
    cutmix_minmax: tuple[float, ...] = ()  # (min, max) box side / image side; () = from lam

    @classmethod
    def from_config(cls, config: Any, num_classes: int) -> MixupOptions | None:
        """The options of ``config``; None when mixing is off (both alphas 0 or ``mixup_prob`` 0)."""
        if config.mixup_mode not in MIXUP_MODES:
            raise ValueError(f"config.mixup_mode must be one of {MIXUP_MODES}; got {config.mixup_mode!r}.")
        for name in ("mixup_alpha", "cutmix_alpha"):
            if config[name] < 0:
                raise ValueError(f"config.{name} must be >= 0 (0: off); got {config[name]}.")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not 0 <= config[name] <= 1:
                raise ValueError(f"config.{name} must be in [0, 1]; got {config[name]}.")
        minmax = tuple(float(v) for v in config.cutmix_minmax)
        if minmax and (len(minmax) != 2 or not 0 <= minmax[0] < minmax[1] <= 1):
            raise ValueError(
                f"config.cutmix_minmax must be (min, max), 0 <= min < max <= 1, or () (off); got {minmax}."
            )
        # timm: cutmix_minmax turns cutmix on, with alpha 1 (lam then only decides whether to mix).
        cutmix_alpha = 1.0 if minmax else float(config.cutmix_alpha)
        if (config.mixup_alpha <= 0 and cutmix_alpha <= 0) or config.mixup_prob <= 0:
            return None
        if config.batch_size % 2:
            raise ValueError(
                f"mixup/cutmix pairs row i with row B-1-i: config.batch_size must be even; got "
                f"{config.batch_size}."
            )
        return cls(
            mixup_alpha=float(config.mixup_alpha),
            cutmix_alpha=cutmix_alpha,
            mixup_prob=float(config.mixup_prob),
            mixup_switch_prob=float(config.mixup_switch_prob),
            mixup_mode=str(config.mixup_mode),
            correct_lam=bool(config.correct_lam),
            label_smoothing=float(config.label_smoothing),
            num_classes=int(num_classes),
            seed=int(config.seed),
            cutmix_minmax=minmax,
        )


class MixDraws(NamedTuple):
    """One draw per row (``'elem'``), per pair (``'pair'``, rows ``i`` and ``B - 1 - i``) or one
    for the batch (``'batch'``), each ``[R]``: timm's ``_params_per_*`` and its box centre."""

    lam: jax.Array  # the Beta draw, or 1.0 where this row is not mixed
    use_cutmix: jax.Array  # bool: paste a box instead of blending
    cy: jax.Array  # the box centre's row, uniform in [0, H)  (timm's rand_bbox)
    cx: jax.Array  # the box centre's column, uniform in [0, W)
    # cutmix_minmax (timm's rand_bbox_minmax): the box's height and width, and then (cy, cx) is
    # its top-left corner; -1: the box's size follows lam.
    cut_h: jax.Array | int = -1
    cut_w: jax.Array | int = -1


def num_draws(mode: str, batch_size: int) -> int:
    return {"batch": 1, "pair": batch_size // 2, "elem": batch_size}[mode]


def step_key(seed: int, step: jax.Array) -> jax.Array:
    """The key of step ``step``'s draws: a function of ``(seed, step)`` only."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _SALT), step)


def draw(key: jax.Array, options: MixupOptions, batch_size: int, height: int, width: int) -> MixDraws:
    """The draws of one global batch, by timm's rules: mixed with probability ``mixup_prob``;
    with both alphas set, cutmix with probability ``mixup_switch_prob``; ``lam ~ Beta(alpha,
    alpha)`` of the chosen kind; the box centre uniform over the image."""
    n = num_draws(options.mixup_mode, batch_size)
    k_apply, k_switch, k_mix, k_cut, k_y, k_x, k_h, k_w = jax.random.split(key, 8)
    apply = jax.random.uniform(k_apply, (n,)) < options.mixup_prob
    mixup_lam = cutmix_lam = None
    if options.mixup_alpha > 0:
        mixup_lam = jax.random.beta(k_mix, options.mixup_alpha, options.mixup_alpha, (n,))
    if options.cutmix_alpha > 0:
        cutmix_lam = jax.random.beta(k_cut, options.cutmix_alpha, options.cutmix_alpha, (n,))
    if mixup_lam is not None and cutmix_lam is not None:
        use_cutmix = jax.random.uniform(k_switch, (n,)) < options.mixup_switch_prob
        lam = jnp.where(use_cutmix, cutmix_lam, mixup_lam)
    else:
        use_cutmix = jnp.full((n,), cutmix_lam is not None)
        lam = cutmix_lam if cutmix_lam is not None else mixup_lam
    lam = jnp.where(apply, lam, 1.0)
    if not options.cutmix_minmax:
        cy = jax.random.randint(k_y, (n,), 0, height)
        cx = jax.random.randint(k_x, (n,), 0, width)
        return MixDraws(lam, use_cutmix, cy, cx)
    lo, hi = options.cutmix_minmax
    cut_h = jax.random.randint(k_h, (n,), int(height * lo), int(height * hi))
    cut_w = jax.random.randint(k_w, (n,), int(width * lo), int(width * hi))
    top = jax.random.randint(k_y, (n,), 0, height - cut_h + 1)
    left = jax.random.randint(k_x, (n,), 0, width - cut_w + 1)
    return MixDraws(lam, use_cutmix, top, left, cut_h, cut_w)


def row_draws(draws: MixDraws, mode: str, batch_size: int) -> MixDraws:
    """Each row's draws ``[B]``: the batch's for every row, a pair's for both its rows."""
    draws = MixDraws(*(jnp.broadcast_to(d, draws.lam.shape) for d in draws))
    if mode == "batch":
        return MixDraws(*(jnp.broadcast_to(d, (batch_size,)) for d in draws))
    if mode == "pair":
        return MixDraws(*(jnp.concatenate([d, d[::-1]]) for d in draws))
    return draws


def cutmix_box(lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int, cut_h=-1, cut_w=-1):
    """``(yl, yh, xl, xh)``: timm's ``rand_bbox`` given its centre draws, clipped to the image;
    where ``cut_h >= 0``, timm's ``rand_bbox_minmax``: that size, its top-left at ``(cy, cx)``."""
    sized = jnp.asarray(cut_h) >= 0
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.where(sized, cut_h, (height * ratio).astype(jnp.int32))  # int() truncates
    cut_w = jnp.where(sized, cut_w, (width * ratio).astype(jnp.int32))
    yl = jnp.where(sized, cy, jnp.clip(cy - cut_h // 2, 0, height))
    yh = jnp.where(sized, cy + cut_h, jnp.clip(cy + (cut_h + 1) // 2, 0, height))
    xl = jnp.where(sized, cx, jnp.clip(cx - cut_w // 2, 0, width))
    xh = jnp.where(sized, cx + cut_w, jnp.clip(cx + (cut_w + 1) // 2, 0, width))
    return yl, yh, xl, xh


def _sharded_as_rows(values: jax.Array, images: jax.Array) -> jax.Array:
    """``values [B]`` sharded as ``images``' rows where the mesh has explicit axes (where JAX
    requires matching shardings); unchanged otherwise."""
    sharding = getattr(jax.typeof(images), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if not spec or spec[0] is None or not isinstance(values, jax.Array):
        return values
    return jax.sharding.reshard(values, jax.sharding.NamedSharding(sharding.mesh, P(spec[0])))


def flip_partner(x: jax.Array) -> jax.Array:
    """Row ``B - 1 - i`` for row ``i`` of a whole batch: timm's ``x.flip(0)``."""
    return x[::-1]


def mix(
    images: jax.Array,
    labels: jax.Array,
    draws: MixDraws,
    *,
    mode: str,
    num_classes: int,
    label_smoothing: float = 0.0,
    correct_lam: bool = True,
    partner: Callable[[jax.Array], jax.Array] = flip_partner,
) -> tuple[jax.Array, jax.Array]:
    """Mixed ``images`` ``[B, H, W, C]`` and soft targets ``[B, num_classes]``, given the draws.

    ``partner`` maps the batch to its mixing partners (timm's flip). Rows whose ``lam`` is 1 are
    unchanged, as timm skips them.
    """
    batch, height, width = images.shape[:3]
    per_row = MixDraws(*(_sharded_as_rows(d, images) for d in row_draws(draws, mode, batch)))
    dtype = images.dtype
    lam = per_row.lam.astype(dtype)
    other = partner(images)

    yl, yh, xl, xh = cutmix_box(lam, per_row.cy, per_row.cx, height, width, per_row.cut_h, per_row.cut_w)
    y = jnp.arange(height)[None, :, None]
    x = jnp.arange(width)[None, None, :]
    r = lambda v: v[:, None, None]  # noqa: E731
    in_box = (y >= r(yl)) & (y < r(yh)) & (x >= r(xl)) & (x < r(xh))
    cut = per_row.use_cutmix & (per_row.lam != 1.0)
    pasted = jnp.where(in_box[..., None], other, images)
    blended = images * lam[:, None, None, None] + other * (1.0 - lam)[:, None, None, None]
    mixed = jnp.where(r(cut)[..., None], pasted, blended)
    mixed = jnp.where(r(per_row.lam == 1.0)[..., None], images, mixed)

    correct = cut if correct_lam else cut & (per_row.cut_h >= 0)  # timm: minmax always corrects
    area = ((yh - yl) * (xh - xl)).astype(dtype)
    lam = jnp.where(correct, 1.0 - area / float(height * width), lam)
    targets = mixup_target(labels, num_classes, lam, label_smoothing, partner)
    return mixed, targets


def mixup_target(
    labels: jax.Array,
    num_classes: int,
    lam: jax.Array,
    label_smoothing: float = 0.0,
    partner: Callable[[jax.Array], jax.Array] = flip_partner,
) -> jax.Array:
    """timm's ``mixup_target``: smoothed one-hot rows mixed with their partners' by ``lam [B]``."""
    off = label_smoothing / num_classes
    on = 1.0 - label_smoothing + off
    y1 = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=bool), on, off).astype(lam.dtype)
    y2 = partner(y1)
    return y1 * lam[:, None] + y2 * (1.0 - lam)[:, None]


def mix_in_step(
    options: MixupOptions, step: jax.Array, images: jax.Array, labels: jax.Array, axis_name: str | None
) -> tuple[jax.Array, jax.Array]:
    """Step ``step``'s mixing of a normalised batch (the whole batch under jit, this device's
    rows under pmap with ``axis_name``): ``(images, soft targets)``."""
    local, height, width = images.shape[:3]
    kwargs = dict(
        mode=options.mixup_mode,
        num_classes=options.num_classes,
        label_smoothing=options.label_smoothing,
        correct_lam=options.correct_lam,
    )
    if axis_name is None:
        draws = draw(step_key(options.seed, step), options, local, height, width)
        return mix(images, labels, draws, **kwargs)
    devices = jax.lax.axis_size(axis_name)
    index = jax.lax.axis_index(axis_name)
    total = local * devices
    draws = draw(step_key(options.seed, step), options, total, height, width)
    mirror = [(d, devices - 1 - d) for d in range(devices)]

    def partner(v: jax.Array) -> jax.Array:
        return jax.lax.ppermute(v[::-1], axis_name, mirror)

    per_row = row_draws(draws, options.mixup_mode, total)
    start = index * local
    mine = MixDraws(*(jax.lax.dynamic_slice_in_dim(d, start, local) for d in per_row))
    return mix(images, labels, mine, partner=partner, **{**kwargs, "mode": "elem"})
