"""Flag parsing for the commands that take ``--config`` (``python -m train``, ``train.aot``):
``app.run(main, flags_parser=cli.parse_flags)``.

On top of absl and ``ml_collections.config_flags`` it gives

* one line (exit 2) instead of a traceback for a config file that does not exist and for a
  ``--config.FIELD`` that the config has not got, with the nearest file or field name;
* ``--config.model.overrides.FIELD=VALUE`` for any field of the model, also one the config
  file does not list (ml_collections accepts only fields the file sets). The value is a Python
  literal (``True``, ``(2, 2)``, ``0.5``) or else a string (``bottleneck``); the names are
  checked against the model's fields at start-up (``train/model.py: check_overrides``).
"""

from __future__ import annotations

import ast
import difflib
import os
import re
import runpy
import sys
from collections.abc import Iterator
from typing import Any

from absl import flags

MODEL_FIELDS = "model.overrides"


def parse_flags(argv: list[str], name: str = "config") -> list[str]:
    """absl's flag parsing for a program with a config flag called ``name``; every error is one
    line and exit status 2."""
    argv = accept_hyphens(flags.FLAGS.read_flags_from_files(argv, force_gnu=False))
    argv, model_fields = _take_model_fields(argv, name)
    path = _flag_value(argv, name)
    if path is not None:
        config = _load(path, name)
        for field in _override_names(argv, name):
            _check_field(config, field, path, name)
    # ml_collections finds the --config.FIELD overrides in sys.argv, not in the argv it is given.
    sys.argv = list(argv)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:  # an unknown flag, a value of the wrong type, a missing --workdir
        fail(f"{' '.join(str(e).split())} (--helpfull lists every flag).")
    if model_fields:
        _set_model_fields(flags.FLAGS[name].value, model_fields)
    return rest


def accept_hyphens(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
    """``--top-k=3`` read as ``--top_k=3`` (and ``--no-find-max-batch`` as ``--nofind_max_batch``):
    the flags are spelt with underscores, as absl's are, and ``resnet_jax.parity``'s argparse
    spelling (``--image-size``) works too. Only names of defined flags are changed."""
    out = list(argv[:1])
    for i, arg in enumerate(argv[1:], 1):
        if arg == "--":
            return out + list(argv[i:])
        match = re.fullmatch(r"(--?)([A-Za-z][\w-]*)(=.*)?", arg, flags=re.S)
        if match and "-" in match.group(2):
            dash, name, value = match.group(1), match.group(2).replace("-", "_"), match.group(3) or ""
            if name in flag_values:
                arg = f"{dash}{name}{value}"
            elif name.startswith("no_") and name[3:] in flag_values:
                arg = f"{dash}no{name[3:]}{value}"
        out.append(arg)
    return out


def help_lists_flags_of(module: str) -> None:
    """absl's ``--help`` lists the flags of the module that ``sys.argv[0]`` names, which for a
    console script (``resnet-jax-train``) is the script, not the program's module: adopt them."""
    for flag in flags.FLAGS.get_key_flags_for_module(module):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def _take_model_fields(argv: list[str], name: str) -> tuple[list[str], dict[str, Any]]:
    """``argv`` without its ``--NAME.model.overrides.FIELD[=VALUE]`` flags, and those fields."""
    pattern = re.compile(rf"^--?{re.escape(name)}\.{re.escape(MODEL_FIELDS)}\.([^=]+)(?:=(.*))?$", re.S)
    kept, fields = [], {}
    args = iter(enumerate(argv))
    for i, arg in args:
        match = pattern.match(arg) if i else None
        if not match:
            kept.append(arg)
            continue
        field, value = match.groups()
        if value is None:  # --config.model.overrides.FIELD VALUE, or a bare boolean flag
            following = argv[i + 1] if i + 1 < len(argv) else None
            if following is not None and not following.startswith("-"):
                value = following
                next(args)
            else:
                value = "True"
        if not field.isidentifier():
            fail(f"--{name}.{MODEL_FIELDS}.{field}: {field!r} is not a field name.")
        fields.pop(field, None)  # the last one given wins, in the order given
        fields[field] = _literal(value)
    return kept, fields


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return {"true": True, "false": False}.get(text.strip().lower(), text)


def _set_model_fields(config: Any, fields: dict[str, Any]) -> None:
    with config.unlocked():
        if config.model.get("overrides") is None:
            config.model.overrides = {}
        overrides = config.model.overrides
        with overrides.ignore_type():
            for field, value in fields.items():
                overrides[field] = value


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv[1:], 1):
        if arg in (f"--{name}", f"-{name}"):
            return argv[i + 1] if i + 1 < len(argv) else None
        for prefix in (f"--{name}=", f"-{name}="):
            if arg.startswith(prefix):
                return arg[len(prefix) :]
    return None


def _load(path: str, name: str) -> Any:
    """The config of ``--NAME=FILE[:ARG]``, or one line naming the nearest file."""
    file, *arg = path.split(":", 1)
    if not os.path.isfile(file):
        folder = os.path.dirname(file)
        if not os.path.isdir(folder or "."):
            folder = os.path.relpath(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs"))
        # An installed train/ (the console scripts) has no configs/ beside it.
        listed = os.listdir(folder or ".") if os.path.isdir(folder or ".") else []
        names = sorted(f for f in listed if f.endswith(".py") and not f.startswith("_"))
        near = difflib.get_close_matches(os.path.basename(file), names, n=1, cutoff=0.6)
        hint = f"; did you mean {os.path.join(folder, near[0])}?" if near else ""
        have = ", ".join(names) or "no .py file"
        fail(f"--{name}={path}: no such file{hint} ({folder or '.'}/ has {have}).")
    # Run once more by the flag itself; config files are cheap and have no side effects.
    return runpy.run_path(file)["get_config"](*arg)


def _override_names(argv: list[str], name: str) -> Iterator[str]:
    pattern = re.compile(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)")
    for arg in argv[1:]:
        match = pattern.match(arg)
        if match:
            yield match.group(1)


def _check_field(config: Any, field: str, path: str, name: str) -> None:
    node = config
    for part in field.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            known = list(_field_paths(config))
            near = difflib.get_close_matches(field, known, n=1, cutoff=0.6)
            hint = f"did you mean --{name}.{near[0]}? " if near else ""
            fail(
                f"--{name}.{field}: the config ({path}) has no field {field!r}; {hint}configs/default.py "
                f"lists every field with its comment."
            )
        node = node[part]


def _field_paths(config: Any, prefix: str = "") -> Iterator[str]:
    for key in config.keys():
        value = config[key]
        yield prefix + key
        if hasattr(value, "keys") and prefix + key != MODEL_FIELDS:
            yield from _field_paths(value, f"{prefix}{key}.")
