"""Pretrained ImageNet weights by name: torchvision's and timm's ResNets as Flax variables.

``model, variables = pretrained.load('resnet50.tv2_in1k')``. :func:`list_pretrained` lists the
names, :func:`info` gives an entry's file, source, published top-1 and preprocessing, and
:func:`locate` finds the file (``path=``, the PyTorch and Hugging Face hub caches, a download),
checking torchvision's sha256 prefixes. docs/pretrained.md is the guide.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import hashlib
import os
import re
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import convert
from resnet_jax.constants import IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD
from resnet_jax.models import ALL_PRESETS, ResNet, get_model
from resnet_jax.weights import TIMM_V2_WEIGHTS, TIMM_WEIGHTS, TORCHVISION_WEIGHTS


class UnknownWeightsError(KeyError):
    """No weights are registered under that name; the message lists close names."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0])


class WeightsNotFoundError(FileNotFoundError):
    """The weights file is neither given, nor cached, nor downloadable."""


class HashMismatchError(ValueError):
    """A weights file's sha256 does not match the prefix its name (or its entry) promises."""


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """The evaluation preprocessing a published accuracy was measured with.

    Resize the shorter side to ``resize`` pixels (``interpolation``), take the central
    ``crop`` x ``crop`` pixels, scale to [0, 1] and normalise each channel with ``mean``/``std``:
    torchvision's ``ImageClassification`` transform, and timm's eval transform with
    ``resize = floor(crop / crop_pct)``.
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __call__(self, image: Any) -> np.ndarray:
        """A PIL image, or a uint8 ``[H, W, 3]`` array, as a float32 ``[crop, crop, 3]`` array."""
        try:
            from PIL import Image
        except ImportError as e:
            raise ImportError("Preprocess needs Pillow: pip install pillow") from e
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        image = image.convert("RGB")
        w, h = image.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.resize, int(self.resize * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        resample = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
        if self.interpolation not in resample:
            raise ValueError(f"interpolation must be one of {sorted(resample)}; got {self.interpolation!r}.")
        image = image.resize(size, resample[self.interpolation])
        left = int(round((size[0] - self.crop) / 2.0))
        top = int(round((size[1] - self.crop) / 2.0))
        image = image.crop((left, top, left + self.crop, top + self.crop))
        x = np.asarray(image, np.float32) / 255.0
        return ((x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """One named set of weights: where its file comes from and how to evaluate it."""

    name: str
    arch: str  # a key of resnet_jax.PRESETS
    file_name: str
    url: Optional[str] = None  # direct download (torchvision); its file is cached as file_name
    hf_hub_id: Optional[str] = None  # Hugging Face repository holding file_name
    sha256: Optional[str] = None  # hex digest or prefix; by default the one in file_name
    num_classes: int = 1000
    preprocess: Preprocess = Preprocess(256, 224)
    top1: Optional[float] = None  # published ImageNet-1k top-1 (%) with `preprocess`
    source: str = ""
    model_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # ResNet overrides

    @property
    def expected_sha256(self) -> Optional[str]:
        if self.sha256:
            return self.sha256.lower()
        match = re.search(r"-([0-9a-f]{8,})\.[^.]+$", self.file_name)
        return match.group(1) if match else None


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """What :func:`load` did: which file it read from where, and whether ``fc`` is fresh."""

    weights: WeightsInfo
    path: str
    found_in: str  # 'path', 'torch hub cache', 'hugging face cache' or 'download'
    num_classes: int
    new_head: bool  # True: fc was freshly initialised (num_classes != the checkpoint's)


_REGISTRY: dict[str, WeightsInfo] = {}
_DEFAULTS: dict[str, str] = {}  # bare preset name -> default weights


def register(
    name: str,
    arch: str,
    *,
    file_name: Optional[str] = None,
    url: Optional[str] = None,
    hf_hub_id: Optional[str] = None,
    sha256: Optional[str] = None,
    num_classes: int = 1000,
    preprocess: Optional[Preprocess] = None,
    top1: Optional[float] = None,
    source: str = "user",
    model_kwargs: Optional[Mapping[str, Any]] = None,
    default: bool = False,
    overwrite: bool = False,
) -> WeightsInfo:
    """Add named weights, so that :func:`load` and :func:`info` know them.

    Args:
        name: The name to load them by, e.g. ``'resnet50.my_in1k'``.
        arch: The architecture, a key of ``resnet_jax.PRESETS``.
        file_name: The weights file's name. Defaults to the URL's last part (``url``) or
            ``model.safetensors`` (``hf_hub_id``); without either, the file comes only from
            ``path=`` or the PyTorch hub cache.
        url: A direct download; the file is cached in the PyTorch hub directory.
        hf_hub_id: A Hugging Face repository holding ``file_name``.
        sha256: Hex digest of the file, or a prefix of it; None checks the prefix in
            ``file_name`` when it carries one, as torchvision's names do.
        num_classes: The classifier's size in the checkpoint.
        preprocess: The evaluation preprocessing the weights expect; None means resize to 256,
            centre crop 224, ImageNet mean/std.
        top1: The published ImageNet-1k top-1 (%) with ``preprocess``, if known; shown, never checked.
        source: Who published the weights (shown by :func:`info`).
        model_kwargs: ResNet fields over the preset's (e.g. smaller ``stage_sizes``).
        default: Make ``arch`` alone name these weights.
        overwrite: Replace weights already registered under ``name``, instead of raising.

    Returns:
        The new registry entry.
    """
    if arch not in ALL_PRESETS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ALL_PRESETS)}.")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"pretrained weights {name!r} are already registered; pass overwrite=True.")
    if file_name is None:
        if url is not None:
            file_name = url.rsplit("/", 1)[-1]
        elif hf_hub_id is not None:
            file_name = "model.safetensors"
        else:
            raise ValueError(f"{name}: give file_name, url or hf_hub_id.")
    entry = WeightsInfo(
        name=name,
        arch=arch,
        file_name=file_name,
        url=url,
        hf_hub_id=hf_hub_id,
        sha256=sha256,
        num_classes=num_classes,
        preprocess=preprocess or Preprocess(256, 224),
        top1=top1,
        source=source,
        model_kwargs=dict(model_kwargs or {}),
    )
    _REGISTRY[name] = entry
    if default:
        _DEFAULTS[arch] = name
    return entry


def list_pretrained(pattern: str = "*") -> list[str]:
    """Names of the registered weights matching a shell pattern, e.g. ``'resnet50*'``."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def info(name: str) -> WeightsInfo:
    """The entry of ``name`` (or of a bare preset name's default weights)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in _DEFAULTS:
        return _REGISTRY[_DEFAULTS[name]]
    candidates = list(_REGISTRY) + list(_DEFAULTS)
    close = difflib.get_close_matches(name, candidates, n=6, cutoff=0.6)
    same_arch = [n for n in _REGISTRY if n.split(".")[0] == name.split(".")[0] and n not in close]
    suggestions = close + same_arch[: max(0, 8 - len(close))]
    hint = f" Close names: {', '.join(suggestions)}." if suggestions else ""
    raise UnknownWeightsError(f"no pretrained weights named {name!r}.{hint} See list_pretrained().")


def torch_hub_dir() -> Path:
    """Where ``torch.hub`` caches downloaded checkpoints: ``$TORCH_HOME/hub/checkpoints``."""
    home = os.environ.get("TORCH_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "torch")
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """Where ``huggingface_hub`` caches repositories (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``)."""
    env = os.environ
    if env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.path.expanduser(env.get("HF_HUB_CACHE") or env["HUGGINGFACE_HUB_CACHE"]))
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def _hf_snapshot_dir(repo_id: str, revision: str = "main") -> Path:
    return hf_hub_cache_dir() / f"models--{repo_id.replace('/', '--')}" / "snapshots" / revision


def _hf_cached(repo_id: str, file_name: str) -> Optional[Path]:
    # The cache layout huggingface_hub documents: refs/main names the snapshot of the branch;
    # snapshots/main/ is also accepted (what try_to_load_from_cache falls back to).
    repo = hf_hub_cache_dir() / f"models--{repo_id.replace('/', '--')}"
    revisions = ["main"]
    ref = repo / "refs" / "main"
    if ref.is_file():
        revisions.insert(0, ref.read_text().strip())
    for revision in revisions:
        candidate = repo / "snapshots" / revision / file_name
        if candidate.is_file():
            return candidate
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_hash(entry: WeightsInfo, path: Path) -> None:
    expected = entry.expected_sha256
    if expected is None:
        return
    actual = _sha256(path)
    if not actual.startswith(expected):
        raise HashMismatchError(
            f"{path} is not the genuine {entry.name} weights file: its sha256 is {actual[:16]}..., "
            f"but {entry.file_name} must start with {expected}. The file was not used. Delete it "
            f"(it is damaged, truncated or another file) and download it again"
            + (f" from {entry.url}." if entry.url else ".")
        )


def _download_url(entry: WeightsInfo, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.partial{os.getpid()}")
    print(f"Downloading {entry.url} to {dest}", file=sys.stderr)
    try:
        with urllib.request.urlopen(entry.url, timeout=60) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f, 1 << 20)
        _check_hash(entry, partial)
        os.replace(partial, dest)  # only a complete, verified file gets the real name
    finally:
        if partial.exists():
            partial.unlink()
    return dest


def _download_hf(entry: WeightsInfo) -> Path:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as e:
        raise OSError("huggingface_hub is not installed (pip install huggingface_hub)") from e
    return Path(hf_hub_download(entry.hf_hub_id, entry.file_name))


def locate(
    entry: WeightsInfo, path: Optional[Union[str, os.PathLike]] = None, download: bool = True
) -> tuple[Path, str]:
    """Find an entry's weights file, from the sources in order (see the module docstring).

    Args:
        entry: The registry entry, from :func:`info`.
        path: A weights file, or a directory holding ``entry.file_name``; when given, no cache or
            download is tried. None searches the PyTorch and Hugging Face hub caches.
        download: Download the file when no cache has it; False never touches the network.

    Returns:
        ``(file, where)``: the file's path and where it was found (``'path'``,
        ``'torch hub cache'``, ``'hugging face cache'`` or ``'download'``).

    Raises:
        WeightsNotFoundError: No source has the file; the message says where to put it.
        HashMismatchError: The file's sha256 is not the published one.
    """
    if path is not None:
        given = Path(path).expanduser()
        if given.is_dir():
            given = given / entry.file_name
        if not given.is_file():
            raise WeightsNotFoundError(f"{entry.name}: no weights file at {given}.")
        if given.name == entry.file_name:  # it claims to be the published file
            _check_hash(entry, given)
        return given, "path"
    if entry.url is not None or entry.hf_hub_id is None:  # not the hub's generic model.safetensors
        cached = torch_hub_dir() / entry.file_name
        if cached.is_file():
            _check_hash(entry, cached)
            return cached, "torch hub cache"
    if entry.hf_hub_id is not None:
        cached = _hf_cached(entry.hf_hub_id, entry.file_name)
        if cached is not None:
            _check_hash(entry, cached)
            return cached, "hugging face cache"

    if entry.url is not None:
        where, link = torch_hub_dir(), entry.url
    elif entry.hf_hub_id is not None:
        where = _hf_snapshot_dir(entry.hf_hub_id)
        link = f"https://huggingface.co/{entry.hf_hub_id}/resolve/main/{entry.file_name}"
    else:
        where, link = torch_hub_dir(), None
    reason = "downloads are off (download=False)"
    if download and link is not None:
        try:
            if entry.url is not None:
                return _download_url(entry, where / entry.file_name), "download"
            file = _download_hf(entry)
            _check_hash(entry, file)
            return file, "download"
        except HashMismatchError:
            raise
        except Exception as e:  # offline, proxy, HTTP error, missing huggingface_hub: one message
            reason = f"the download failed ({type(e).__name__}: {e})"
    elif link is None:
        reason = "it has no download source"
    fetch = f" Download {link} and put it" if link else " Put it"
    raise WeightsNotFoundError(
        f"{entry.name}: the weights file {entry.file_name} is not cached and {reason}.{fetch} in "
        f"{where}/ (or pass path=...)."
    )


def load(
    name: str,
    *,
    path: Optional[Union[str, os.PathLike]] = None,
    num_classes: Optional[int] = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    download: bool = True,
    rng: Union[int, jax.Array] = 0,
    return_info: bool = False,
    **overrides: Any,
) -> Union[tuple[ResNet, dict], tuple[ResNet, dict, LoadInfo]]:
    """A Linen ResNet and its variables for named pretrained weights.

    Every tensor is the checkpoint's, exactly, except a fresh ``fc`` when ``num_classes`` asks
    for another classifier (fine-tuning).

    Args:
        name: Registered weights (:func:`list_pretrained`), or a bare preset name for its default.
        path: A weights file or a directory holding it, read instead of the caches (see
            :func:`locate`).
        num_classes: The classifier's size. None, or the checkpoint's own count, keeps the
            checkpoint's ``fc``; another count initialises a fresh one as ``torch.nn.Linear``
            does, from ``rng``.
        dtype: The model's compute dtype.
        param_dtype: The dtype of the returned parameters (BatchNorm statistics: at least float32).
        download: Download the file when no cache has it; False never touches the network.
        rng: Seed or PRNG key for a fresh ``fc``; unused otherwise.
        return_info: Also return a :class:`LoadInfo` (which file, found where, fresh head or not).
        **overrides: Other ResNet fields (``axis_name``, ``bn_variance``, ...).

    Returns:
        ``(model, variables)``, or ``(model, variables, LoadInfo)`` with ``return_info=True``;
        ``variables`` is ``{'params': ..., 'batch_stats': ...}`` of numpy arrays.
    """
    entry = info(name)
    file, found_in = locate(entry, path, download)
    state_dict = convert.load_torch_checkpoint(file)
    fields = {**entry.model_kwargs, **overrides, "dtype": dtype, "param_dtype": param_dtype}
    model: ResNet = get_model(entry.arch, num_classes=entry.num_classes, **fields)
    try:
        variables = convert.torch_to_flax(state_dict, model, num_classes=num_classes, rng=rng)
    except convert.StateDictMismatchError as e:
        raise e.with_context(f"{file} does not hold the {entry.name} weights ({entry.arch}):") from None
    new_head = num_classes is not None and num_classes != entry.num_classes
    if num_classes is not None:
        model = model.clone(num_classes=num_classes)
    stat_dtype = jnp.promote_types(param_dtype, jnp.float32)
    variables = {
        "params": jax.tree.map(lambda a: np.asarray(a, param_dtype), variables["params"]),
        # GroupNorm models (BiT) keep no statistics.
        "batch_stats": jax.tree.map(lambda a: np.asarray(a, stat_dtype), variables.get("batch_stats", {})),
    }
    if not return_info:
        return model, variables
    return model, variables, LoadInfo(entry, str(file), found_in, model.num_classes, new_head)


def _register_builtin() -> None:
    newest: dict[str, int] = {}
    for arch, version, file_name, resize, top1 in TORCHVISION_WEIGHTS:
        register(
            f"{arch}.tv{'' if version == 1 else version}_in1k",
            arch,
            url=f"https://download.pytorch.org/models/{file_name}",
            preprocess=Preprocess(resize, 224, "bilinear"),
            top1=top1,
            source=f"torchvision IMAGENET1K_V{version}",
            default=version > newest.get(arch, 0),  # torchvision's DEFAULT is its newest
        )
        newest[arch] = max(version, newest.get(arch, 0))
    for name, size, crop_pct, top1 in TIMM_WEIGHTS:
        arch = name.split(".")[0]
        register(
            name,
            arch,
            hf_hub_id=f"timm/{name}",
            preprocess=Preprocess(int(size / crop_pct), size, "bicubic"),
            top1=top1,
            source="timm",
            default=arch not in _DEFAULTS,  # timm's first tag, for the archs torchvision lacks
        )
    for name, size, crop_pct, interpolation, classes in TIMM_V2_WEIGHTS:
        arch = name.split(".")[0]
        register(
            name,
            arch,
            hf_hub_id=f"timm/{name}",
            num_classes=classes,
            preprocess=Preprocess(int(size / crop_pct), size, interpolation, INCEPTION_MEAN, INCEPTION_STD),
            source="timm",
            default=arch not in _DEFAULTS,
        )


_register_builtin()
