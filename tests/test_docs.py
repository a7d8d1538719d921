"""Every ```python block in README.md, CONTRIBUTING.md and docs/*.md runs, so the docs cannot rot.

The blocks of one page run in order in one namespace (a later block may use an earlier one's
names), in a temporary directory that holds the files the pages name: ``resnet18.pth`` and
``resnet18.safetensors`` (a randomly initialised ResNet-18 saved with ``resnet_jax.convert``) and
two small JPEGs, ``cat.jpg`` and ``dog.jpg``. The pages use tiny shapes themselves, so nothing
is substituted and what a reader copies is what ran.

A block that cannot run here (it needs a download, a TPU or minutes of compute) has the line
``<!-- skip: REASON -->`` just before its opening fence. It is still compiled (a syntax error
fails), then reported as skipped by its page and line with that reason. ```bash blocks are
never run.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP = re.compile(r"<!--\s*skip:\s*(.+?)\s*-->")
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


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a Markdown page, with their skip marks."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
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
                raise ValueError(f"{path.name}:{start + 1}: a ```python block is never closed.")
            blocks.append(
                Block(str(path.relative_to(ROOT)), start + 1, "\n".join(body) + "\n", mark and mark.group(1))
            )
        i += 1
    return blocks


ALL = [b for p in PAGES if p.exists() for b in python_blocks(p)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the files the pages load: a ResNet-18 state_dict and two JPEGs."""
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
    return d


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


@pytest.mark.parametrize("block", [b for b in ALL if b.skip is not None], ids=lambda b: b.name)
def test_skipped_block_compiles(block: Block) -> None:
    """A block marked skip still parses; it is reported as skipped, by name, with its reason."""
    compile(block.code, block.name, "exec")
    pytest.skip(f"{block.name}: {block.skip}")


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
