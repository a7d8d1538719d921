"""A run's checkpoint as a PyTorch state_dict:

    python -m train.export --workdir DIR --out FILE.pth|FILE.safetensors [--step N] [--ema]

Keys are torchvision's (timm's for the -D/-T presets), so the same architecture in PyTorch loads
the file with ``load_state_dict(strict=True)``: e.g. ``torchvision.models.resnet50(num_classes=K)``
for a ``resnet50`` run on K classes (with the run's ``config.model.overrides``). ``.safetensors``
needs no PyTorch. The class names go beside the weights, one per line (``FILE.classes.txt``).
``DIR`` and ``FILE`` may be ``gs://`` paths. ``--ema`` writes the EMA weights of a run with
``config.ema_decay > 0`` (``train/ema.py``) instead of the trained ones: the model timm's and
torchvision's recipes report.
"""

from __future__ import annotations

import os
import sys
import tempfile

from absl import app, flags, logging


def _define_flags() -> None:
    """Flags exist only when this module runs as a program, so importing it beside
    ``train.predict`` (which also has ``--workdir``) never clashes."""
    flags.DEFINE_string("workdir", None, "Workdir of a training run.")
    flags.DEFINE_string("out", None, "Output file: .pth, .pt or .safetensors.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
    flags.DEFINE_bool("ema", False, "Export the EMA weights (runs with config.ema_decay > 0).")
    flags.mark_flags_as_required(["workdir", "out"])


def export(workdir: str, out: str, step: int | None = None, *, ema: bool = False) -> dict:
    """Write the checkpoint of ``workdir`` as a PyTorch state_dict, with its class names beside it.

    Args:
        workdir: A run's workdir (local or ``gs://``), of a preset architecture.
        out: The file to write (``.safetensors``, ``.pth`` or ``.pt``; may be ``gs://``).
        step: The checkpoint step to export; None: the newest.
        ema: Export the EMA weights (``ConfigError`` when the run kept none); False: the trained.

    Returns:
        The state_dict written, as numpy arrays.
    """
    from resnet_jax import convert
    from train import build, checkpoint, paths
    from train.class_names import beside, write_class_names
    from train.config import ConfigError
    from train.model import BASE_ARCH, create_model

    config, info = build.load_run_info(workdir)
    if config.model.arch == BASE_ARCH:
        raise ConfigError(
            f"{workdir} trained config.model.arch={BASE_ARCH!r}, which has no torchvision/timm "
            f"counterpart to load the file; export works for the presets (resnet18, resnet50, ...)."
        )
    model, _ = create_model(config, info)
    try:
        variables = checkpoint.restore_variables(workdir, step, ema=ema)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    except ValueError as e:  # --ema of a run without an EMA
        raise ConfigError(f"{str(e).rstrip('.')}; export its trained weights without --ema.") from None
    write_class_names(beside(out), info.class_names)
    if not paths.is_remote(out):
        return convert.save_torch_checkpoint(variables, out, arch=model)
    # The writers need a local file: write one in a temporary directory, then upload it.
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, paths.Path(out).name)
        state_dict = convert.save_torch_checkpoint(variables, local, arch=model)
        paths.Path(local).copy(out, overwrite=True)
    return state_dict


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax's INFO lines; --verbosity=0 brings them back
    from resnet_jax.platform import skip_absent_tpu
    from train.config import ConfigError

    skip_absent_tpu()
    try:
        state_dict = export(flags.FLAGS.workdir, flags.FLAGS.out, flags.FLAGS.step, ema=flags.FLAGS.ema)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    from train.class_names import beside

    out, what = flags.FLAGS.out, " (the EMA weights)" if flags.FLAGS.ema else ""
    print(f"wrote {len(state_dict)} tensors{what} to {out}, class names to {beside(out)}")


def run() -> None:
    """The ``resnet-jax-export`` console script: ``python -m train.export`` from anywhere."""
    from train.cli import accept_hyphens, help_lists_flags_of

    _define_flags()
    help_lists_flags_of(__name__)
    app.run(main, flags_parser=lambda argv: app.parse_flags_with_usage(accept_hyphens(argv)))


if __name__ == "__main__":
    run()
