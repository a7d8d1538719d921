"""PyTorch module paths and their Linen and NNX spellings.

A layer is named by its PyTorch path (``layer1.0.downsample.1``). Linen writes a list index as a
suffix of its parent's name (``layer1_0/downsample_1``); NNX keeps it as an ``nnx.List`` index
(``layer1[0].downsample[1]``). Weight conversion maps the spellings with these functions.
"""

from __future__ import annotations

from typing import Optional, Sequence


def linen_name(path: str) -> str:
    """The Linen name of a PyTorch module path within its parent: ``layer1.0`` -> ``layer1_0``."""
    return path.replace(".", "_")


def split_index(path: str) -> tuple[str, Optional[int]]:
    """``downsample.1`` -> ``('downsample', 1)``; a name without an index -> ``(name, None)``."""
    group, _, index = path.partition(".")
    return (group, int(index)) if index else (path, None)


def linen_path(torch_parts: Sequence[str]) -> tuple[str, ...]:
    """A PyTorch module path (``['layer1', '0', 'conv1']``) as Linen names (``layer1_0/conv1``)."""
    out: list[str] = []
    for part in torch_parts:
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def torch_path(linen_names: Sequence[str]) -> str:
    """Linen names (``('layer1_0', 'downsample_1')``) as a PyTorch path (``layer1.0.downsample.1``)."""
    parts = []
    for name in linen_names:
        head, _, tail = name.rpartition("_")
        parts.append(f"{head}.{tail}" if head and tail.isdigit() else name)
    return ".".join(parts)
