"""The shape of the code: no import cycles (imports inside functions included), no file over 500
lines, and the dataset's name compared in the data registry only.

It covers ``train/`` and ``resnet_jax/``.
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("train", "resnet_jax")
MAX_LINES = 500


def _modules(package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of ``package`` (``__init__`` is the
    package itself)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``module`` imports anywhere in its file (functions too)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from a import b``: the module a.b where b is one, else a.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
            ]
        else:
            continue
        for name in names:
            while name and name not in known:  # ``import a.b.c`` of a name below a module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    modules = {}
    for package in PACKAGES:
        modules.update(_modules(package))
    return {m: _imported(m, p, set(modules)) for m, p in modules.items()}


def test_no_import_cycles_counting_imports_inside_functions():
    graph = _graph()
    assert graph["train.loop"] >= {"train.build", "train.data.core"}  # the parser sees imports
    assert "train.loop" in graph["train.__main__"]  # ... including those inside functions
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_file_over_500_lines():
    long = {}
    for package in PACKAGES:
        for path in _modules(package).values():
            n = len(path.read_text().splitlines())
            if n > MAX_LINES:
                long[str(path.relative_to(REPO))] = n
    assert long == {}


def _name_constants(trees: list[ast.AST], names: set[str]) -> set[str]:
    """Upper-case constants assigned a source's name (``SYNTHETIC = "synthetic"``)."""
    out = set()
    for tree in trees:
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Constant)
                and node.value.value in names
            ):
                out |= {t.id for t in node.targets if isinstance(t, ast.Name) and t.id.isupper()}
    return out


def _dataset_name_reads(tree: ast.AST, names: set[str], constants: set[str] = frozenset()) -> list[int]:
    """Lines that compare to anything ``<x>.dataset``, ``info.name``, a source's name in
    ``names``, or a constant in ``constants`` holding one."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            ident = operand.attr if isinstance(operand, ast.Attribute) else getattr(operand, "id", None)
            is_info_name = ident == "name" and ast.unparse(operand).split(".")[-2:-1] == ["info"]
            is_source_name = isinstance(operand, ast.Constant) and operand.value in names
            if ident == "dataset" or ident in constants or is_info_name or is_source_name:
                lines.append(node.lineno)
                break
    return lines


def test_only_the_data_registry_compares_the_dataset_name():
    from train.data import registry

    names = set(registry.SOURCES)
    trees = {m: ast.parse(p.read_text(), str(p)) for m, p in _modules("train").items()}
    constants = _name_constants(list(trees.values()), names)
    found = {m: lines for m, tree in trees.items() if (lines := _dataset_name_reads(tree, names, constants))}
    assert found == {}
    # The check sees a comparison where there is one.
    old = ast.parse(
        "SYNTHETIC = 'synthetic'\nif name == SYNTHETIC: pass\nx = run.info.name != 'image_folder'"
    )
    assert _name_constants([old], names) == {"SYNTHETIC"}
    assert _dataset_name_reads(old, names, {"SYNTHETIC"}) == [2, 3]
    assert _dataset_name_reads(ast.parse("if config.dataset != 'x': pass"), names) == [1]
