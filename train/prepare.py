"""Download and prepare a run's TFDS dataset once, before training:

    python -m train.prepare --config=configs/cifar10.py [--config.data_dir=DIR]
    python -m train.prepare --config=configs/imagenet_resnet50.py --config.manual_dir=TARS

It does what ``--config.download=True`` does at the start of a run, on its own: the same
config, so the dataset lands where the run will read it (``config.data_dir``, ``''`` for TFDS's
default ``~/tensorflow_datasets``). Use it instead of TFDS's ``tfds build``, which stops at
start-up without Apache Beam (tensorflow/datasets#5463; Beam is not installed here, since it
pins an older protobuf than TensorFlow's). It prints what it prepared, or one line saying why it
could not (exit 2), for example a download that failed: prepare on a machine with a network and
copy ``data_dir`` over, or point ``--config.data_dir`` at a copy.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training configuration file (a configs/*.py) whose dataset to prepare.", lock_config=True
)
flags.mark_flags_as_required(["config"])


def prepare(config) -> str:
    """Prepare ``config.dataset`` (a TFDS name) in ``config.data_dir`` and say what is there."""
    from train.data import registry
    from train.data.tfds import TFDSSource

    if registry.get(config.dataset) is not TFDSSource:
        return (
            f"{config.dataset} is not a TFDS dataset: nothing to prepare; the run reads it as it is."
        )
    config.unlock()
    config.download = True
    source = registry.create_dataset(config)
    info = source.info
    where = config.data_dir or "TFDS's default data_dir (~/tensorflow_datasets)"
    return f"{info.name}: {info.num_train_examples} train, {info.num_eval_examples} eval images, in {where}"


def _download_failure(error: BaseException) -> str | None:
    """One line for a download that failed (no network, a proxy, a server), else None."""
    chain, seen = [], error
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    names = {type(e).__name__ for e in chain}
    network = {
        "ConnectionError",
        "ProxyError",
        "DownloadError",
        "URLError",
        "SSLError",
        "Timeout",
        "ConnectTimeout",
    }
    if not names & network:
        return None
    reason = " ".join(str(chain[-1]).split())[:200] or type(chain[-1]).__name__
    return (
        f"the download failed ({reason}). Check the network (and any proxy), or prepare the dataset on "
        "a machine that has one and copy its data_dir here (--config.data_dir=DIR)."
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from resnet_jax.platform import skip_absent_tpu
    from train.config import ConfigError
    from train.data.core import DatasetError

    skip_absent_tpu()
    config = _CONFIG.value
    try:
        print(prepare(config), flush=True)
    except (ConfigError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except Exception as e:
        line = _download_failure(e)
        if line is None:
            raise
        print(f"error: preparing {config.dataset}: {line}", file=sys.stderr, flush=True)
        sys.exit(2)


def run() -> None:
    """The ``resnet-jax-prepare`` console script: ``python -m train.prepare`` from anywhere."""
    from train.cli import help_lists_flags_of, parse_flags

    help_lists_flags_of(__name__)
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
