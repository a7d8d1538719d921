"""docs/tpu.md quotes the run's defaults and the Python version: they must be the files' own.

The page writes each default it quotes as a code span ``FIELD = VALUE``, as the config file
does, and the config it names is the one every command on the page trains with. The commands
themselves run in tests/test_docs.py.
"""

import ast
import configparser
import re
from pathlib import Path
from runpy import run_path

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "tpu.md").read_text()
CONFIG = "configs/imagenet_resnet50.py"
# A quoted default: `batch_size = 1024`, `model.arch = 'resnet50'`.
DEFAULT = re.compile(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*) = ([^`]+)`")


def test_defaults_quoted_on_the_page_are_the_configs():
    config = run_path(str(ROOT / CONFIG))["get_config"]()
    quoted = {name: ast.literal_eval(value) for name, value in DEFAULT.findall(PAGE)}
    # The three a researcher plans a run with must be quoted, not only correct when present.
    assert {"batch_size", "log_every_steps", "checkpoint_every_steps"} <= quoted.keys(), quoted
    assert f"The defaults of `{CONFIG}`" in PAGE
    for name, value in quoted.items():
        actual = config
        for part in name.split("."):
            actual = actual[part]
        assert actual == value, f"docs/tpu.md says `{name} = {value!r}`; {CONFIG} has {actual!r}"


def test_page_trains_with_the_config_whose_defaults_it_quotes():
    runs = re.findall(r"python -m train --config=(\S+)", PAGE)
    assert runs and set(runs) == {CONFIG}, runs


def test_venv_python_on_the_vms_is_the_oldest_the_package_allows():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", setup["options"]["python_requires"].strip()).group(1)
    venvs = re.findall(r"uv venv [^\n]*--python ([0-9.]+)", PAGE)
    assert venvs and set(venvs) == {floor}, (venvs, floor)
    assert f"Python {floor} or newer" in PAGE
