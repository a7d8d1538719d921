"""The pure train and eval steps: state creation, loss, metrics, and nothing about devices.

``train_step(state, batch) -> (state, metrics)`` is plain JAX. Parallelism is added from outside
by the drivers of ``train/parallel.py`` (``jax.jit`` over a mesh, or ``jax.pmap``), which wrap
the *same* function. Under jit the step is built with ``axis_name=None`` (the batch is one
global array, and XLA inserts the gradient all-reduce); under pmap with
``axis_name=parallel.PMAP_AXIS``, so gradients, metrics and BatchNorm statistics are averaged
over that axis.

Public API (stable; also used by benchmark scripts)::

    state = create_train_state(rng, model, tx, input_shape, dynamic_scale=False)
    train_step = make_train_step(model, tx, label_smoothing=0.1, axis_name=None, lr_schedule=f,
                                 input_stats=(mean, std))
    eval_step = make_eval_step(model, axis_name=None, input_stats=(mean, std))

Batches are dicts ``{'image': [B, H, W, C], 'label': [B] int}`` (training also takes soft targets,
``'label': [B, num_classes]``, as mixup makes): float images are taken as
normalised, ``uint8`` images as pixels that the step normalises with ``input_stats=(mean, std)``
(per channel, 0..255 units) on the device; eval batches may add
``'mask'`` ([B], 1 for real examples, 0 for padding). Train metrics are batch means
(``loss``, ``accuracy``, ``top5_accuracy``, ``learning_rate``, ``grad_norm``, and with float16
loss scaling ``loss_scale`` and ``skipped_step``); eval metrics are sums
(``loss_sum``, ``correct``, ``correct_top5``, ``count``) so that padded, uneven last batches
average correctly; ``summarize_eval`` turns accumulated sums into means.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax.training.dynamic_scale import DynamicScale

from train import accum
from train.mixup import MixupOptions, mix_in_step

PyTree = Any
Batch = Mapping[str, jax.Array]
Metrics = dict[str, jax.Array]
StepFn = Callable[["TrainState", Batch], tuple["TrainState", Metrics]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree of arrays only (easy to checkpoint).

    The model and optimizer are not stored here: the step functions close over them, so the
    state can be donated, sharded and saved without static fields getting in the way.
    ``dynamic_scale`` is ``None`` unless float16 loss scaling is on; ``ema`` (``{'params',
    'batch_stats'}``, the moving average of ``train/ema.py``) is ``None`` unless the EMA is on.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    dynamic_scale: DynamicScale | None = None
    ema: PyTree | None = None

    @property
    def variables(self) -> dict[str, PyTree]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    tx: optax.GradientTransformation,
    input_shape: Sequence[int],
    *,
    dynamic_scale: bool = False,
    init_model: nn.Module | None = None,
) -> TrainState:
    """Initialise parameters, BatchNorm statistics and optimizer state.

    ``input_shape`` is one example batch's shape ``[B, H, W, C]`` (B can be 1). Pure and
    jittable: the drivers call it under ``jax.jit`` to create the state directly on device.
    ``init_model`` (same variables, other dtypes) draws the initial values instead, cast to
    ``model``'s dtypes: a float64 twin starts from its float32 run's exact initial values.

    Args:
        rng: PRNG key of the initialisation.
        model: The Linen model to train.
        tx: The optimizer; its state is initialised from the parameters.
        input_shape: One example batch's shape ``[B, H, W, C]``.
        dynamic_scale: Add a ``DynamicScale`` (loss scaling, for float16).
        init_model: A model with the same variables in other dtypes that draws the initial
            values; None: ``model`` draws them.
    """
    x = jnp.zeros(tuple(input_shape), jnp.float32)
    variables = (init_model or model).init(rng, x, train=False)
    if init_model is not None:
        like = jax.eval_shape(functools.partial(model.init, train=False), rng, x)
        variables = jax.tree.map(lambda v, s: v.astype(s.dtype), variables, like)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        dynamic_scale=DynamicScale() if dynamic_scale else None,
    )


# The training losses (``config.loss``).
LOSSES = ("softmax", "bce")


def _targets(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Class probabilities ``[B, C]`` in the loss's dtype: int ``labels`` ``[B]`` one-hot, soft
    targets (mixup's) as given."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 for a float64 run
    if labels.ndim == logits.ndim:
        return labels.astype(dtype)
    return jax.nn.one_hot(labels, logits.shape[-1], dtype=dtype)


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy, as ``torch.nn.CrossEntropyLoss(label_smoothing=)``:
    ``labels`` are int classes ``[B]`` or probabilities ``[B, C]``, either smoothed towards
    uniform (``t * (1 - s) + s / C``)."""
    targets = _targets(logits, labels)
    if label_smoothing:
        targets = targets * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
    return optax.softmax_cross_entropy(logits.astype(targets.dtype), targets)


def binary_cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    label_smoothing: float = 0.0,
    target_threshold: float = 0.0,
    sum_classes: bool = False,
) -> jax.Array:
    """Per-example sigmoid cross-entropy over the classes, as timm's ``BinaryCrossEntropy``
    (the loss of "ResNet strikes back"): each class is its own yes/no question.

    Int ``labels`` become one-hot targets smoothed as timm does (``s / C`` off, ``1 - s + s / C``
    on); soft targets ``[B, C]`` are taken as given (timm leaves their smoothing to mixup).
    ``target_threshold`` > 0 makes every target above it 1 and the rest 0. The mean over the
    batch of these values is timm's loss: each is the mean over the classes, or with
    ``sum_classes`` (timm's ``sum_classes``) their sum.
    """
    targets = _targets(logits, labels)
    if label_smoothing and labels.ndim < logits.ndim:
        off = label_smoothing / logits.shape[-1]
        targets = targets * (1.0 - label_smoothing) + off
    if target_threshold:
        targets = (targets > target_threshold).astype(targets.dtype)
    per_class = optax.sigmoid_binary_cross_entropy(logits.astype(targets.dtype), targets)
    return per_class.sum(-1) if sum_classes else per_class.mean(-1)


def make_loss(
    loss: str = "softmax",
    *,
    label_smoothing: float = 0.0,
    bce_target_threshold: float = 0.0,
    bce_sum: bool = False,
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """``loss(logits, labels) -> [B]``, the per-example training loss named ``loss``
    (``'softmax'``: :func:`cross_entropy`; ``'bce'``: :func:`binary_cross_entropy`)."""
    if loss == "softmax":
        return functools.partial(cross_entropy, label_smoothing=label_smoothing)
    if loss == "bce":
        return functools.partial(
            binary_cross_entropy,
            label_smoothing=label_smoothing,
            target_threshold=bce_target_threshold,
            sum_classes=bce_sum,
        )
    raise ValueError(f"loss must be 'softmax' or 'bce'; got {loss!r}.")


def hard_labels(labels: jax.Array) -> jax.Array:
    """Int classes ``[B]`` for the accuracy metrics: soft targets' most likely class."""
    return jnp.argmax(labels, axis=-1) if labels.ndim == 2 else labels


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy against soft targets ``[B, C]`` (mixup's)."""
    dtype = jnp.promote_types(logits.dtype, jnp.float32)
    return optax.softmax_cross_entropy(logits.astype(dtype), targets.astype(dtype))


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Per-example 1.0 where ``labels`` is among the ``k`` largest logits, else 0.0."""
    k = min(k, logits.shape[-1])
    if k == 1:
        return (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


InputStats = tuple[Sequence[float], Sequence[float]]


def model_input(images: jax.Array, input_stats: InputStats | None) -> jax.Array:
    """The model's input: ``uint8`` pixels normalised as ``(x - mean) / std``; floats unchanged."""
    if images.dtype != jnp.uint8:
        return images
    if input_stats is None:
        raise ValueError(
            "this batch holds uint8 pixels but the step has no normalisation statistics; build it "
            "with input_stats=(mean, std) (the dataset's info.mean and info.std) or feed "
            "normalised float images."
        )
    mean, std = (jnp.asarray(v, jnp.float32) for v in input_stats)
    return (images.astype(jnp.float32) - mean) / std


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    label_smoothing: float = 0.0,
    loss: str = "softmax",
    bce_target_threshold: float = 0.0,
    bce_sum: bool = False,
    dropout_rng: jax.Array | None = None,
    axis_name: str | None = None,
    lr_schedule: optax.Schedule | None = None,
    input_stats: InputStats | None = None,
    mixup: MixupOptions | None = None,
    grad_accum_steps: int = 1,
    grad_accum_unroll: bool = False,
) -> StepFn:
    """Return the pure ``train_step(state, batch) -> (state, metrics)``.

    One step: forward in train mode (BatchNorm batch statistics, running averages updated),
    loss, gradients, optax update. ``axis_name`` is the pmap axis to average gradients and metrics
    over (None under jit, where the batch is one global array). ``input_stats`` normalises
    ``uint8`` batches (``model_input``). With ``state.dynamic_scale`` set
    the loss is scaled for float16, and a step with non-finite gradients is skipped while the
    scale shrinks.

    Args:
        model: The Linen model, called with ``train=True``.
        tx: The optimizer.
        label_smoothing: Label smoothing of the loss (0: none).
        loss: ``'softmax'`` (cross-entropy) or ``'bce'`` (timm's binary cross-entropy); see
            :func:`make_loss`. ``batch['label']`` may hold int classes or soft targets ``[B, C]``.
        bce_target_threshold: ``'bce'``: targets above it become 1, the rest 0 (0: off).
        bce_sum: ``'bce'``: sum over the classes instead of the mean.
        dropout_rng: The key of a model with dropout or drop path (``drop_rate``,
            ``drop_path_rate``): each step draws from it folded with the step number (and the
            pmap device), so a resumed run draws what the uninterrupted one did. None: the
            model draws nothing.
        axis_name: The pmap axis; None under jit.
        lr_schedule: Adds the step's learning rate to the metrics; None leaves it out.
        input_stats: ``(mean, std)`` per channel on the 0-255 pixel scale (the dataset's
            ``info.mean``, ``info.std``), normalising ``uint8`` batches on the device; None:
            batches must hold normalised floats.
        mixup: Mixup/cutmix of each normalised batch, keyed on ``(seed, state.step)``, against
            soft targets (``train/mixup.py``); None: off, and the step is as without it.
        grad_accum_steps: k > 1 splits each (per-device) batch into k micro-batches after mixup,
            their gradients averaged into one update (``train/accum.py``); not with float16
            loss scaling.
        grad_accum_unroll: The micro-batches' loop unrolled in the compiled step: for a CPU
            backend, where XLA runs convolutions in a loop body slowly (``train/accum.py``).
    """

    per_example_loss = make_loss(
        loss, label_smoothing=label_smoothing, bce_target_threshold=bce_target_threshold, bce_sum=bce_sum
    )

    def loss_fn(params, batch_stats, batch, rngs):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            model_input(batch["image"], input_stats),
            train=True,
            mutable=["batch_stats"],
            **rngs,
        )
        if "target" in batch and loss == "softmax":  # mixed: soft targets, already smoothed
            per_example = soft_cross_entropy(logits, batch["target"])
        else:  # timm's BCE takes mixed targets as given, and smooths only int labels
            per_example = per_example_loss(logits, batch.get("target", batch["label"]))
        return jnp.mean(per_example), (logits, updates["batch_stats"])

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        if mixup is not None:
            images = model_input(batch["image"], input_stats)
            images, targets = mix_in_step(mixup, state.step, images, batch["label"], axis_name)
            batch = {**batch, "image": images, "target": targets}
        rngs = {}
        if dropout_rng is not None:
            key = jax.random.fold_in(dropout_rng, state.step)
            if axis_name is not None:  # each device its own draws
                key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
            rngs = {"rngs": {"dropout": key}}
        if grad_accum_steps > 1:
            if state.dynamic_scale is not None:
                raise ValueError("grad_accum_steps > 1 does not support float16 loss scaling.")
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, (logits, batch_stats)), grads = accum.accumulated_value_and_grad(
                grad_fn,
                grad_accum_steps,
                state.params,
                state.batch_stats,
                batch,
                rngs,
                unroll=grad_accum_unroll,
            )
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
            dynamic_scale, is_finite = None, None
        elif state.dynamic_scale is not None:
            # DynamicScale pmeans the gradients itself when given the axis.
            grad_fn = state.dynamic_scale.value_and_grad(loss_fn, has_aux=True, axis_name=axis_name)
            dynamic_scale, is_finite, (loss, (logits, batch_stats)), grads = grad_fn(
                state.params, state.batch_stats, batch, rngs
            )
        else:
            grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
            (loss, (logits, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, rngs)
            if axis_name is not None:
                grads = jax.lax.pmean(grads, axis_name)
            dynamic_scale, is_finite = None, None

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            dynamic_scale=dynamic_scale,
        )
        if is_finite is not None:
            # Keep the old parameters and optimizer state when the scaled gradients overflowed.
            keep = lambda new, old: jnp.where(is_finite, new, old)
            new_state = new_state.replace(
                params=jax.tree.map(keep, params, state.params),
                opt_state=jax.tree.map(keep, opt_state, state.opt_state),
                batch_stats=jax.tree.map(keep, batch_stats, state.batch_stats),
            )

        labels = hard_labels(batch["label"])
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(topk_correct(logits, labels, 1)),
            "top5_accuracy": jnp.mean(topk_correct(logits, labels, 5)),
        }
        if axis_name is not None:
            metrics = jax.lax.pmean(metrics, axis_name)
        # Gradients are already averaged over devices here; the loop checks this for NaN/Inf.
        metrics["grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
        if is_finite is not None:
            # 1.0 for a float16 step skipped (and the loss scale lowered) on overflow.
            metrics["skipped_step"] = 1.0 - is_finite.astype(jnp.float32)
        if lr_schedule is not None:
            metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        if dynamic_scale is not None:
            metrics["loss_scale"] = dynamic_scale.scale
        return new_state, metrics

    return train_step


def make_eval_step(
    model: nn.Module, *, axis_name: str | None = None, input_stats: InputStats | None = None
) -> Callable[[TrainState, Batch], Metrics]:
    """Return the pure ``eval_step(state, batch) -> sums`` (running BatchNorm statistics).

    Returns sums over the real examples (``batch['mask']`` weights, default all ones) of the
    unsmoothed loss and of top-1/top-5 hits, plus their ``count``: sums, so that batches and
    hosts of any size combine, padding excluded, before the one division.

    Args:
        model: The Linen model, called with ``train=False``.
        axis_name: The pmap axis to sum over; None under jit.
        input_stats: ``(mean, std)`` normalising ``uint8`` batches, as for
            :func:`make_train_step`.
    """

    def eval_step(state: TrainState, batch: Batch) -> Metrics:
        logits = model.apply(state.variables, model_input(batch["image"], input_stats), train=False)
        labels = batch["label"]
        mask = batch.get("mask")
        mask = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
        sums = {
            "loss_sum": jnp.sum(cross_entropy(logits, labels) * mask),
            "correct": jnp.sum(topk_correct(logits, labels, 1) * mask),
            "correct_top5": jnp.sum(topk_correct(logits, labels, 5) * mask),
            "count": jnp.sum(mask),
        }
        if axis_name is not None:
            sums = jax.lax.psum(sums, axis_name)
        return sums

    return eval_step


def summarize_eval(sums: Mapping[str, float]) -> dict[str, float]:
    """Turn accumulated eval sums into ``loss``, ``accuracy``, ``top5_accuracy``."""
    count = max(float(sums["count"]), 1.0)
    return {
        "loss": float(sums["loss_sum"]) / count,
        "accuracy": float(sums["correct"]) / count,
        "top5_accuracy": float(sums["correct_top5"]) / count,
        "num_examples": round(float(sums["count"])),
    }
