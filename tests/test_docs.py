"""Every ```python block in README.md, CONTRIBUTING.md and docs/*.md runs, so the docs cannot rot.

The blocks of one page run in order in one namespace (a later block may use an earlier one's
names), in a temporary directory that holds the files the pages name: ``resnet18.pth`` and
``resnet18.safetensors`` (a randomly initialised ResNet-18 saved with ``resnet_jax.convert``),
two small JPEGs, ``cat.jpg`` and ``dog.jpg``, this checkout's ``configs/``, and
``imagenet_tars/``: ImageNet's two tar files holding a few JPEGs, which docs/tpu.md prepares with
TFDS's real imagenet2012 builder and no network. The pages use tiny shapes themselves, so
nothing is substituted and what a reader copies is what ran.

Every block, marked skip or not, must also paste into Python's prompt: ``code.InteractiveConsole``
compiles it line by line as a pasted block is, so a ``def`` needs a blank line before the next
top-level statement.

A block that cannot run here (it needs a download, a TPU or minutes of compute) has the line
``<!-- skip: REASON -->`` just before its opening fence. It is still compiled (a syntax error
fails), then reported as skipped by its page and line with that reason.

```bash blocks run only on the pages in ``SHELL_PAGES`` (docs/tpu.md, whose readers copy shell
commands): there every ```bash block runs, in order, in one ``bash -euo pipefail`` script in the
same directory, with this interpreter first on ``PATH`` (as in an activated venv), unless it is
marked skip; a marked one is still parsed (``bash -n``). A block that calls ``gcloud`` must be
marked. Other pages' ```bash blocks are never run.
"""

from __future__ import annotations

import code
import dataclasses
import io
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*skip:\s*(.+?)\s*-->")
SHELL_PAGES = [ROOT / "docs" / "tpu.md"]  # pages whose ```bash blocks run too
# One worker under `-n 2 --dist loadgroup`: the pages share the fixture and JAX's compiled ops,
# which a second worker would pay for again.
pytestmark = pytest.mark.xdist_group("docs")


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # the reason, for a block marked <!-- skip: ... -->

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"


def python_blocks(path: Path, lang: str = "python") -> list[Block]:
    """The ```python (or ```LANG) blocks of a Markdown page, with their skip marks."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```" + lang:
            start = i
            j = i - 1
            while j >= 0 and not lines[j].strip():
                j -= 1
            mark = SKIP.search(lines[j]) if j >= 0 else None
            i += 1
            body = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            if i == len(lines):
                raise ValueError(f"{path.name}:{start + 1}: a ```{lang} block is never closed.")
            blocks.append(
                Block(str(path.relative_to(ROOT)), start + 1, "\n".join(body) + "\n", mark and mark.group(1))
            )
        i += 1
    return blocks


ALL = [b for p in PAGES if p.exists() for b in python_blocks(p)]
SHELL = [b for p in SHELL_PAGES for b in python_blocks(p, "bash")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the files the pages load: a ResNet-18 state_dict, two JPEGs, ``configs/``
    (this checkout's) and ``imagenet_tars/``, a tiny ImageNet in ImageNet's two tar files."""
    import jax
    import jax.numpy as jnp
    from PIL import Image

    import resnet_jax
    from resnet_jax import convert

    d = tmp_path_factory.mktemp("docs")
    # Random values of the right shapes (positive variances): the pages convert and run these
    # weights, and an abstract init avoids paying for a real one here.
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(
        lambda: resnet_jax.resnet18().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )
    variables = jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32) * 0.05, shapes)
    convert.save_torch_checkpoint(variables, d / "resnet18.pth", arch="resnet18")
    convert.save_torch_checkpoint(variables, d / "resnet18.safetensors", arch="resnet18")
    for name in ("cat.jpg", "dog.jpg"):
        Image.fromarray(rng.integers(0, 256, (80, 96, 3), dtype=np.uint8)).save(d / name)
    (d / "configs").symlink_to(ROOT / "configs")
    _tiny_imagenet_tars(d / "imagenet_tars", rng)
    return d


def _tiny_imagenet_tars(manual_dir: Path, rng: np.random.Generator) -> None:
    """ILSVRC2012_img_train.tar (one inner tar of JPEGs per class, named by its synset) and
    ILSVRC2012_img_val.tar (JPEGs whose sorted names TFDS pairs with its validation labels), as
    TFDS's imagenet2012 builder reads them: 2 classes x 3 train images, 3 validation images."""
    from PIL import Image

    def jpeg() -> bytes:
        out = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(out, "JPEG")
        return out.getvalue()

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    manual_dir.mkdir()
    with tarfile.open(manual_dir / "ILSVRC2012_img_train.tar", "w") as train:
        for synset in ("n01440764", "n01443537"):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as images:
                for i in range(3):
                    add(images, f"{synset}_{i}.JPEG", jpeg())
            add(train, f"{synset}.tar", inner.getvalue())
    with tarfile.open(manual_dir / "ILSVRC2012_img_val.tar", "w") as val:
        for i in range(1, 4):
            add(val, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg())


def test_pages_have_blocks() -> None:
    """The extractor finds the README's quick starts (a broken fence would hide every block)."""
    readme = [b for b in ALL if b.page == "README.md"]
    assert len(readme) >= 2 and all("import" in b.code for b in readme)


@pytest.mark.parametrize("page", sorted({b.page for b in ALL if b.skip is None}))
def test_page_runs(page: str, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The page's runnable blocks, in order, in one namespace, in ``workdir``."""
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": "__docs__"}
    for block in (b for b in ALL if b.page == page and b.skip is None):
        try:
            exec(compile(block.code, block.name, "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"the block at {block.name} failed: {type(e).__name__}: {e}") from e


class _Paste(code.InteractiveConsole):
    """The interactive prompt, compiling only: its SyntaxErrors, by line of the block."""

    def __init__(self) -> None:
        super().__init__()
        self.line, self.errors = 0, []

    def runcode(self, compiled) -> None:  # compile, never run
        pass

    def showsyntaxerror(self, filename=None, **kwargs) -> None:
        error = sys.exc_info()[1]
        self.errors.append(f"line {self.line}: {type(error).__name__}: {error.msg}")


def repl_paste_errors(source: str) -> list[str]:
    """What pasting ``source`` into ``python``'s prompt line by line reports (the prompt ends a
    compound statement at a blank line, so a top-level line straight after a ``def`` body fails)."""
    console = _Paste()
    for console.line, line in enumerate(source.splitlines() + [""], 1):
        console.push(line)
    return console.errors


def test_repl_paste_check_finds_a_def_without_a_blank_line() -> None:
    assert repl_paste_errors("def f():\n    return 1\nx = f()\n")
    assert not repl_paste_errors("@staticmethod\ndef f():\n    return 1\n\nx = (\n    f()\n)\n")


def test_blocks_paste_into_the_repl() -> None:
    """Every ```python block, as a reader pastes it into the Python prompt."""
    failed = {b.name: errors for b in ALL if (errors := repl_paste_errors(b.code))}
    assert not failed, f"blocks that the Python prompt rejects when pasted: {failed}"


@pytest.mark.parametrize("block", [b for b in ALL if b.skip is not None], ids=lambda b: b.name)
def test_skipped_block_compiles(block: Block) -> None:
    """A block marked skip still parses; it is reported as skipped, by name, with its reason."""
    compile(block.code, block.name, "exec")
    pytest.skip(f"{block.name}: {block.skip}")


@pytest.mark.parametrize("page", sorted({b.page for b in SHELL if b.skip is None}))
def test_page_shell_runs(page: str, workdir: Path) -> None:
    """The page's runnable ```bash blocks, in order, as one script, in ``workdir``."""
    blocks = [b for b in SHELL if b.page == page and b.skip is None]
    # Never reach a Cloud project from a test, even before the check below has run.
    assert not [b.name for b in blocks if re.search(r"\bgcloud\b", b.code)], "unmarked gcloud blocks"
    script = "\n".join(b.code for b in blocks)
    env = {
        **os.environ,
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (
        f"{page}: the shell blocks failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )


@pytest.mark.parametrize("block", [b for b in SHELL if b.skip is not None], ids=lambda b: b.name)
def test_skipped_shell_block_parses(block: Block) -> None:
    """A marked shell block still parses (``bash -n``); it is reported as skipped, with its reason."""
    proc = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
    assert proc.returncode == 0, f"{block.name}: {proc.stderr}"
    pytest.skip(f"{block.name}: {block.skip}")


def test_gcloud_shell_blocks_are_marked() -> None:
    """A shell block that calls gcloud needs a Cloud project: it must say so, never run here."""
    assert SHELL, "no ```bash blocks found on the shell pages"
    unmarked = [b.name for b in SHELL if re.search(r"\bgcloud\b", b.code) and b.skip is None]
    assert not unmarked, f"gcloud blocks without <!-- skip: REASON -->: {unmarked}"


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", [p for p in PAGES if p.exists()], ids=lambda p: p.name)
def test_links_resolve(page: Path) -> None:
    """Every relative link of a page names a file that exists and, with ``#...``, a heading in it."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page.name}: broken links {broken}"
