"""Command line: ``python -m train --config=configs/default.py --workdir=DIR``.

``--config.FIELD=VALUE`` overrides any field of the config file (see ``configs/default.py`` for
all of them). Re-running the same command on the same workdir resumes from its newest
checkpoint; ``--config.eval_only=True`` evaluates the newest checkpoint instead.

Exit status: 0 when done or after SIGTERM (preemption: the current step is saved first), 130
after Ctrl-C (SIGINT: the current step is saved first, as for SIGTERM; a second Ctrl-C stops at
once without saving), 2 for a config or dataset error, 3 when the loss, gradients or parameters
became NaN/Inf.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (a configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:
        # Outside the training steps (start-up, compilation of the first step runs inside them,
        # the final evaluation), or a second Ctrl-C: the checkpoints already saved are whole.
        print(
            "Interrupted (Ctrl-C) without saving; rerun the same command to resume from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(130)


def _main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if not flags.FLAGS["verbosity"].present:
        # Library INFO logs (orbax, TF) would bury the progress bar; --verbosity=0 brings them back.
        logging.set_verbosity(logging.WARNING)

    # Imported here so that --help stays fast and distributed init precedes any JAX use.
    from resnet_jax.platform import skip_absent_tpu
    from train import loop
    from train.compile_cache import enable_compilation_cache
    from train.config import ConfigError
    from train.data.core import DatasetError
    from train.distributed import maybe_initialize_distributed

    skip_absent_tpu()  # libtpu installed for train.aot, but no TPU here: no TPU start-up attempt
    enable_compilation_cache(config.compilation_cache_dir)
    try:
        maybe_initialize_distributed(config)
        summary = loop.train_and_evaluate(config, _WORKDIR.value)
    except (ConfigError, DatasetError) as e:
        # A bad config or a missing dataset is the user's to fix: one line, no traceback.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except loop.NonFiniteError as e:
        # The message names the step and the checkpoint to resume from; a traceback adds nothing.
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(3)
    if summary.get("stopped_by") == "SIGINT":
        sys.exit(130)  # the shell's status for Ctrl-C; the step is saved (the line above says so)


def run() -> None:
    """The ``resnet-jax-train`` console script: ``python -m train`` from anywhere."""
    from train.cli import help_lists_flags_of, parse_flags

    help_lists_flags_of(__name__)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
