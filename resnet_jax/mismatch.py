"""What goes wrong when weights do not fit a model: one error with structured fields, and the
one-phrase description of an architecture used in it.

:class:`StateDictMismatchError` carries ``missing``, ``unexpected`` and ``wrong_shapes`` keys,
the ``target`` model's description and the architecture the weights ``looks_like``; its message
lists them all. Callers that want one line (``train/init_from.py``) format those fields.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

from resnet_jax.presets import PRESETS


class WrongShape(NamedTuple):
    """A key whose array has another shape than the model's (both as the target side lays it out)."""

    key: str
    got: tuple[int, ...]
    expected: tuple[int, ...]

    def __str__(self) -> str:
        return f"{self.key}: got {self.got}, expected {self.expected}"


class StateDictMismatchError(ValueError):
    """Weights (a state_dict, or Linen variables) do not fit the target model.

    Fields: ``target`` (the model, described), ``missing`` and ``unexpected`` (keys),
    ``wrong_shapes`` (:class:`WrongShape`), ``looks_like`` (the architecture the weights fit, if
    recognised, else ``None``), ``hints`` (what to do), ``context`` (where the weights came from).
    A plain message, for weights that are no ResNet's at all, leaves the lists empty.

    Args:
        message: The first line: what did not fit.
        target: The model, described.
        missing: Keys the model needs that the weights lack.
        unexpected: Keys in the weights that the model has no place for.
        wrong_shapes: Keys present on both sides with different shapes.
        looks_like: The architecture the weights fit, if recognised, else None.
        hints: Lines saying what to do.
        context: A line put first, saying where the weights came from (a file name, ...).
    """

    def __init__(
        self,
        message: str = "",
        *,
        target: str = "",
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        wrong_shapes: Sequence[WrongShape] = (),
        looks_like: Optional[str] = None,
        hints: Sequence[str] = (),
        context: str = "",
    ):
        self.target, self.looks_like, self.context = target, looks_like, context
        self.missing, self.unexpected = tuple(missing), tuple(unexpected)
        self.wrong_shapes, self.hints = tuple(wrong_shapes), tuple(hints)
        self.message = message
        super().__init__(self._format())

    def with_context(self, context: str) -> StateDictMismatchError:
        """The same error, with a first line saying where the weights came from."""
        fields = {k: getattr(self, k) for k in ("target", "missing", "unexpected", "wrong_shapes")}
        return StateDictMismatchError(
            self.message, **fields, looks_like=self.looks_like, hints=self.hints, context=context
        )

    def problems(self, limit: int = 20) -> list[str]:
        """One ``'kind (count): first, second, ...'`` item per non-empty kind."""
        out = []
        for title, items in (
            ("missing keys", self.missing),
            ("unexpected keys", self.unexpected),
            ("wrong shapes", [str(w) for w in self.wrong_shapes]),
        ):
            if items:
                more = " ..." if len(items) > limit else ""
                out.append(f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more)
        return out

    def _format(self) -> str:
        lines = [self.context] if self.context else []
        lines.append(self.message)
        lines += [f"  {p}" for p in self.problems()] + [f"  {h}" for h in self.hints]
        if self.target:
            hint = f" The state_dict looks like {self.looks_like}." if self.looks_like else ""
            lines.append(f"  Build the model that matches the weights.{hint}")
        return "\n".join(line for line in lines if line)


def compare(
    got: Mapping[tuple, tuple[int, ...]],
    expected: Mapping[tuple, tuple[int, ...]],
    name: Callable[[tuple], str],
) -> tuple[list[str], list[str], list[WrongShape]]:
    """``(missing, unexpected, wrong_shapes)`` of arrays ``got`` against the model's ``expected``
    shapes, keys spelt by ``name``, sorted."""
    missing = sorted(name(k) for k in expected if k not in got)
    unexpected = sorted(name(k) for k in got if k not in expected)
    wrong = sorted(
        WrongShape(name(k), got[k], expected[k]) for k in got if k in expected and got[k] != expected[k]
    )
    return missing, unexpected, wrong


# The fields that define a ResNet's weights (not its numerics or head), and their defaults.
_ARCH_DEFAULTS = dict(
    block="bottleneck",
    groups=1,
    width_per_group=64,
    stem_type="",
    stem_width=64,
    avg_down=False,
    attn_layer="",
)


def describe(model: Any, prefix: str = "") -> str:
    """``'ResNet (resnet50)'``, ``'ResNet (stage_sizes=(1, 1), block=basic)'`` or
    ``'ResNetBase(n_blocks=..., ...)'``: a Linen or NNX model by its architecture fields."""
    name = prefix + type(model).__name__
    if hasattr(model, "stage_sizes"):  # a ResNet, either API
        arch = {"stage_sizes": tuple(model.stage_sizes), **{k: getattr(model, k) for k in _ARCH_DEFAULTS}}
        for preset, fields in PRESETS.items():
            if {**_ARCH_DEFAULTS, **fields, "stage_sizes": tuple(fields["stage_sizes"])} == arch:
                return f"{name} ({preset})"
        extra = "".join(
            f", {k}={arch[k]!r}" for k in list(_ARCH_DEFAULTS)[1:] if arch[k] != _ARCH_DEFAULTS[k]
        )
        return f"{name} (stage_sizes={arch['stage_sizes']}, block={model.block}{extra})"
    if hasattr(model, "n_blocks"):  # a ResNetBase
        parts = [f"n_blocks={tuple(model.n_blocks)}", f"n_channels={tuple(model.n_channels)}"]
        if model.bottlenecks is not None:
            parts.append(f"bottlenecks={tuple(model.bottlenecks)}")
        for k, default in (("img_channels", 3), ("first_kernel_size", 7)):
            if getattr(model, k) != default:
                parts.append(f"{k}={getattr(model, k)}")
        strides = model.strides if model.strides is not None else (1,) + (2,) * (len(model.n_channels) - 1)
        parts.append(f"strides={tuple(strides)}")
        if model.conv_bias:
            parts.append("conv_bias=True")
        return f"{name}(" + ", ".join(parts) + ")"
    return name
