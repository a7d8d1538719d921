"""Command line: ``python -m train.aot --config=configs/imagenet_resnet50.py --topology=v5e:2x2``."""

from __future__ import annotations

import json
import sys

import jax

from train.aot.check import format_report, run_aot, save_executables
from train.aot.topology import ACCEPTED_FORMS, AotError, parse_topology, require_libtpu


def _flags():
    from absl import flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "Training configuration file (configs/*.py).")
    flags.DEFINE_string("topology", None, f"The TPU slice: {ACCEPTED_FORMS}.")
    flags.DEFINE_integer("num_slices", 1, "Number of identical slices (multi-slice over DCN).")
    flags.DEFINE_integer(
        "batch_per_chip", 0, "Set config.batch_size to this many images per chip (0: keep the config's)."
    )
    flags.DEFINE_bool("find_max_batch", False, "Also find the largest per-device batch that fits.")
    flags.DEFINE_string("save", None, "Write the serialized executables to this file.")
    flags.DEFINE_string("json", None, "Write the report as JSON to this file.")
    flags.mark_flags_as_required(["config", "topology"])
    return config


def main(argv: list[str]) -> None:
    from absl import app, flags, logging

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")  # compiling for a TPU needs no device at all
    FLAGS = flags.FLAGS
    config = _CONFIG.value
    try:
        slice_ = parse_topology(FLAGS.topology, FLAGS.num_slices)
        if slice_.generation != "cpu":
            require_libtpu()
        if FLAGS.batch_per_chip > 0:
            config.batch_size = FLAGS.batch_per_chip * slice_.chips
        result = run_aot(
            config,
            slice_,
            find_max_batch=FLAGS.find_max_batch,
            progress=lambda m: print(m, file=sys.stderr, flush=True),
            for_saving=bool(FLAGS.save),
        )
    except AotError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(format_report(result), flush=True)
    if FLAGS.json:
        from etils import epath

        epath.Path(FLAGS.json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    if FLAGS.save:
        save_executables(result, FLAGS.save)
        print(
            f"saved the executables to {FLAGS.save}; python -m train --config.aot_executable={FLAGS.save} "
            f"loads them when jax, libtpu, flags, devices and the program match"
        )


def run() -> None:
    """The ``resnet-jax-aot`` console script: ``python -m train.aot`` from anywhere."""
    global _CONFIG
    from absl import app

    from train.cli import help_lists_flags_of, parse_flags

    _CONFIG = _flags()
    help_lists_flags_of(__name__)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
