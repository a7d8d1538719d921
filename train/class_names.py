"""The class names of a run, as a text file: one name per line, line ``i`` naming class ``i``.

``WORKDIR/class_names.txt`` is written when a run starts; ``train.export`` writes the same file
beside the exported weights (``model.pth`` -> ``model.classes.txt``), so the PyTorch side reads
them with ``open(path).read().splitlines()``. Paths may be ``gs://`` (``etils.epath``).
"""

from __future__ import annotations

from collections.abc import Sequence

from etils import epath

CLASS_NAMES_FILE = "class_names.txt"


def _check(names: Sequence[str]) -> None:
    bad = [n for n in names if "\n" in n or "\r" in n]
    if bad:
        raise ValueError(f"class names cannot hold line breaks: {bad[0]!r}")


def write_class_names(path: str | epath.Path, names: Sequence[str]) -> None:
    """Write ``names`` to the file ``path``, one per line."""
    _check(names)
    epath.Path(path).write_text("".join(f"{n}\n" for n in names))


def read_class_names(path: str | epath.Path) -> tuple[str, ...]:
    return tuple(epath.Path(path).read_text().splitlines())


def save_class_names(workdir: str | epath.Path, names: Sequence[str]) -> None:
    """``WORKDIR/class_names.txt``."""
    write_class_names(epath.Path(workdir) / CLASS_NAMES_FILE, names)


def load_class_names(workdir: str | epath.Path) -> tuple[str, ...]:
    return read_class_names(epath.Path(workdir) / CLASS_NAMES_FILE)


def beside(weights_file: str) -> str:
    """Where ``train.export`` puts the class names of ``weights_file``: ``NAME.classes.txt``."""
    path = str(weights_file)
    stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1] else path
    return f"{stem}.classes.txt"
