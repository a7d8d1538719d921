"""Our image-folder training input against torchvision's and timm's, with automatic augmentation
and random erasing: images/s per core on ImageNet-sized JPEGs.

``python -m benchmarks.augment_input [--recipes ta_wide,rand-m9-mstd0.5-inc1] [--cores 1,all]
[--rounds 3] [--total-images 1024]``

Each recipe is an ``auto_augment`` value, timed on both sides on the same files (written by
``benchmarks.input_pipeline.write_jpegs``, laid out as an image folder):

* ours: the training program's image-folder input (``train/data/image_folder.py`` through
  ``input_workers.time_folder_training``) with ``auto_augment`` set to the recipe,
  ``random_erase_prob`` (``--re-prob``), ``image_size`` (``--image-size``), the Inception crop,
  the flip and bilinear interpolation; the Grain worker count the training program starts on
  those cores (``grain_worker_count=-1``) unless ``--grain-workers`` says otherwise. Its batches
  are normalised float32 (random erasing works on the normalised image).
* the reference: torchvision's ``ImageFolder`` and ``DataLoader`` (as many workers as cores,
  Pillow loading, float32 batches) with, for torchvision's policies (``ta_wide``, ``ra``, ``aa``),
  its reference script's ``transforms.v2`` training preset (``RandomResizedCrop`` bilinear and
  antialiased, flip, the policy with bilinear sampling, ``PILToTensor``, ``ToDtype``,
  ``Normalize``, ``RandomErasing``), and for timm's ``rand-`` strings timm's own
  ``create_transform(..., is_training=True, auto_augment=..., re_prob=...)`` with its training
  default ``interpolation='random'`` (which our ``rand-`` policies follow in their ops; our crop
  stays bilinear).

Per core count, one worker process confined to that many cores (``report.pin_to_cores``, as
``benchmarks.input_pipeline`` pins its workers; the worker processes of both sides inherit it)
runs ``--rounds`` rounds; in each, every recipe times both sides, in alternating order from
round to round. Prints one JSON object: every run, and per recipe and core count the median
images/s of each side, per core and per CPU second (the CPU time of the process and its worker
processes: the pipeline's own work on a machine shared with other jobs), the median per-round
ratio ours / reference, and how many cores our input needs to feed one accelerator at
``--model-rate`` images/s at that core count's per-core rate (``cores_one_accelerator_needs``:
the most over the core counts measured).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from benchmarks.input_pipeline import core_counts, jpeg_folder
from benchmarks.report import available_cpus, emit_json, host_environment, pin_to_cores

# The images/s of one H100 training ResNet-50 that issue 44 sizes the host for.
MODEL_RATE_IMAGES_PER_S = 7000.0
TORCHVISION_POLICIES = ("ta_wide", "ra", "aa")
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's and timm's Normalize, in 0..1 units
IMAGENET_STD = (0.229, 0.224, 0.225)


def reference_name(recipe: str) -> str:
    """Whose transforms the recipe is compared with: ``'torchvision'`` or ``'timm'``."""
    return "timm" if recipe.startswith("rand-") else "torchvision"


def reference_transform(recipe: str, image_size: int, re_prob: float) -> Any:
    """The reference's training transform for ``recipe`` (see the module docstring)."""
    from resnet_jax.torch_reference import import_reference

    if reference_name(recipe) == "timm":
        timm = import_reference("timm")
        _keep_zero_bits_black(timm.data.auto_augment)
        return timm.data.create_transform(
            image_size, is_training=True, auto_augment=recipe, re_prob=re_prob, interpolation="random"
        )
    import_reference("torchvision")
    import torch
    from torchvision.transforms import InterpolationMode, v2

    bilinear = InterpolationMode.BILINEAR
    policy = {
        "ta_wide": lambda: v2.TrivialAugmentWide(interpolation=bilinear),
        "ra": lambda: v2.RandAugment(interpolation=bilinear),
        "aa": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET, interpolation=bilinear),
    }[recipe]()
    return v2.Compose(
        [
            v2.RandomResizedCrop(image_size, interpolation=bilinear, antialias=True),
            v2.RandomHorizontalFlip(0.5),
            policy,
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.RandomErasing(re_prob),
            v2.ToPureTensor(),
        ]
    )


def _keep_zero_bits_black(timm_aa: Any) -> None:
    """Where Pillow refuses to posterize to 0 bits (Pillow 13), timm's ``PosterizeIncreasing``
    raises at level 10 (a draw of ``mstd0.5`` about m9 clipped there): its posterize ops then
    make the image black, as Pillow before 13 did and ``train/augment_timm.py`` does."""
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return
    except ValueError:
        pass
    original = timm_aa.posterize

    def posterize(img: Any, bits_to_keep: int, **kwargs: Any) -> Any:
        if bits_to_keep < 1:
            return Image.new(img.mode, img.size)
        return original(img, bits_to_keep, **kwargs)

    for name, fn in list(timm_aa.NAME_TO_OP.items()):
        if fn is original:
            timm_aa.NAME_TO_OP[name] = posterize


def time_reference(args: argparse.Namespace, recipe: str, root: str, seed: int) -> dict[str, Any]:
    """``_rate_record`` of torchvision's ``ImageFolder`` + ``DataLoader`` (one worker per core)
    with the reference transform, over one endless-looking epoch (a sampler of every image needed,
    so no epoch boundary stalls the workers, as in our stream)."""
    import torch
    from torchvision.datasets import ImageFolder

    from benchmarks.input_workers import _rate_record, _time_batches

    workers = len(available_cpus())
    dataset = ImageFolder(
        os.path.join(root, "train"), reference_transform(recipe, args.image_size, args.re_prob)
    )
    batches = max(args.total_images // args.batch, 1)
    warmup = max(args.warmup_batches, 1) + 2 * workers  # each worker's prefetched first batches
    torch.manual_seed(seed)
    sampler = torch.utils.data.RandomSampler(dataset, num_samples=(warmup + batches) * args.batch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch, sampler=sampler, num_workers=workers, drop_last=True
    )
    it = ({"image": x.numpy(), "label": y.numpy()} for x, y in loader)
    elapsed, cpu, last = _time_batches(it, warmup, batches)
    it.close()  # ends the loader's iterator, and with it its worker processes
    return {
        **_rate_record(reference_name(recipe), batches * args.batch, elapsed, last, cpu),
        "workers": workers,
    }


def time_ours(args: argparse.Namespace, recipe: str, seed: int) -> dict[str, Any]:
    """``_rate_record`` of the training program's image-folder input with the recipe's fields."""
    from benchmarks.input_workers import folder_config, time_folder_training
    from train.data.image_folder import worker_count

    config = folder_config(args.jpeg_dir, args.image_size, args.grain_workers, seed)
    config.update({"auto_augment": recipe, "random_erase_prob": args.re_prob, "interpolation": "bilinear"})
    record = time_folder_training("ours", config, args.batch, args.total_images, args.warmup_batches)
    return {
        **record,
        "workers": worker_count(config),
        "auto_augment": config.auto_augment,
        "random_erase_prob": config.random_erase_prob,
    }


def run_worker(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every round's runs in this (pinned) process: both sides of each recipe, alternating."""
    from benchmarks.input_workers import _folder_layout

    root = _folder_layout(args.jpeg_dir)
    runs = []
    for r in range(args.rounds):
        for recipe in args.recipes:
            sides = ("ours", "reference") if r % 2 == 0 else ("reference", "ours")
            for side in sides:
                seed = args.seed + r
                if side == "ours":
                    run = time_ours(args, recipe, seed)
                else:
                    run = time_reference(args, recipe, root, seed)
                runs.append({"recipe": recipe, "round": r, **run})
    return runs


def summarise(runs: Sequence[dict[str, Any]], recipes: Sequence[str], model_rate: float) -> dict[str, Any]:
    """Per recipe and core count: each side's median rates, the median per-round ratio ours /
    reference, and the cores our input needs at ``model_rate`` images/s at that per-core rate."""

    def med(values: Sequence[float]) -> float:
        return round(statistics.median(values), 3)

    out: dict[str, Any] = {}
    for recipe in recipes:
        ref = reference_name(recipe)
        rows: dict[str, Any] = {"reference": ref}
        needs = []
        for cores in sorted({r["cores"] for r in runs if r["recipe"] == recipe}):
            mine = [r for r in runs if r["recipe"] == recipe and r["cores"] == cores]
            by_round: dict[int, dict[str, dict[str, Any]]] = {}
            for r in mine:
                by_round.setdefault(r["round"], {})[r["variant"]] = r
            row: dict[str, Any] = {}
            for side in ("ours", ref):
                done = [r for r in mine if r["variant"] == side]
                row[f"{side}_images_per_s"] = med([r["images_per_s"] for r in done])
                row[f"{side}_images_per_s_per_core"] = med([r["images_per_s_per_core"] for r in done])
                cpu = [r["images_per_cpu_s"] for r in done if r["images_per_cpu_s"]]
                row[f"{side}_images_per_cpu_s"] = med(cpu) if cpu else None
            pairs = [v for v in by_round.values() if "ours" in v and ref in v]
            row[f"ours_over_{ref}"] = med([p["ours"]["images_per_s"] / p[ref]["images_per_s"] for p in pairs])
            row["cores_for_model_rate"] = math.ceil(model_rate / row["ours_images_per_s_per_core"])
            needs.append(row["cores_for_model_rate"])
            rows[f"{cores} core(s)"] = row
        rows["cores_one_accelerator_needs"] = max(needs)
        out[recipe] = rows
    return out


def run_all(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    with jpeg_folder(args.jpeg_dir, args.num_images, args.seed) as (jpeg_dir, jpegs):
        runs: list[dict[str, Any]] = []
        worker: dict[str, Any] = {}
        for cores in core_counts(args.cores):
            print(f"[augment_input] {cores} core(s)", file=sys.stderr, flush=True)
            cmd = [sys.executable, "-m", "benchmarks.augment_input", "--worker", f"--pin-cores={cores}"]
            cmd += [f"--jpeg-dir={jpeg_dir}", f"--recipes={','.join(args.recipes)}"]
            for name in ("image_size", "batch", "total_images", "warmup_batches", "rounds", "seed"):
                cmd.append(f"--{name.replace('_', '-')}={getattr(args, name)}")
            cmd += [f"--re-prob={args.re_prob}", f"--grain-workers={args.grain_workers}"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"worker with {cores} core(s) failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout)
            runs += out.pop("runs")
            worker = out
    return {
        "benchmark": "augment_input",
        "config": {
            "image_size": args.image_size,
            "batch": args.batch,
            "images_per_run": max(args.total_images // args.batch, 1) * args.batch,
            "rounds": args.rounds,
            "random_erase_prob": args.re_prob,
            "grain_worker_count": args.grain_workers,
        },
        "jpegs": jpegs,
        "environment": {**host_environment(), **worker},
        "command": "python -m benchmarks.augment_input " + " ".join(argv),
        "model_rate_images_per_s": args.model_rate,
        "recipes": summarise(runs, args.recipes, args.model_rate),
        "runs": runs,
    }


def versions() -> dict[str, Any]:
    """The libraries both sides ran on, and our JPEG decoder."""
    import grain
    import PIL
    import torch
    import torchvision

    from train.data import image_ops

    out = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "grain": getattr(grain, "__version__", "?"),
        "pillow": PIL.__version__,
        "our_jpeg_decoder": "simplejpeg" if image_ops.simplejpeg is not None else "pillow",
    }
    if "timm" in sys.modules:
        out["timm"] = sys.modules["timm"].__version__
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.augment_input",
        description="Images/s per core of our augmented image-folder input against torchvision's "
        "and timm's (JSON on stdout).",
    )
    p.add_argument(
        "--recipes", default="ta_wide,rand-m9-mstd0.5-inc1", help="comma-separated auto_augment values"
    )
    p.add_argument("--num-images", type=int, default=256, help="distinct JPEG files to write")
    p.add_argument("--jpeg-dir", help="use (or fill, if empty) this directory instead of a temp one")
    p.add_argument("--image-size", type=int, default=176)
    p.add_argument("--re-prob", type=float, default=0.1, help="random erasing probability, both sides")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--total-images", type=int, default=1024, help="timed images per run")
    p.add_argument("--warmup-batches", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds per core count")
    p.add_argument("--cores", default="1,all", help="comma-separated core counts, or 'all'")
    p.add_argument(
        "--grain-workers",
        type=int,
        default=-1,
        help="our Grain worker processes (-1: the training program's default for the cores)",
    )
    p.add_argument("--model-rate", type=float, default=MODEL_RATE_IMAGES_PER_S, help="accelerator images/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", metavar="FILE", help="also write the JSON to FILE")
    # Internal: one pinned process's rounds.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pin-cores", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    for recipe in args.recipes:
        if recipe not in TORCHVISION_POLICIES and not recipe.startswith("rand-"):
            p.error(
                f"--recipes: unknown {recipe!r}; choose from "
                f"{', '.join(TORCHVISION_POLICIES)} or timm's 'rand-...' strings"
            )
    for name in ("num_images", "image_size", "batch", "total_images", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0.0 <= args.re_prob <= 1.0:
        p.error("--re-prob must be in [0, 1]")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        pin_to_cores(args.pin_cores)  # before torch, Grain and their worker processes start
        from resnet_jax.torch_reference import import_reference

        import_reference("torchvision")
        if any(reference_name(r) == "timm" for r in args.recipes):
            import_reference("timm")
        result = {"runs": run_worker(args), **versions()}
    else:
        result = run_all(args, argv)
    emit_json(result, args.output)
    return result


if __name__ == "__main__":
    main()
