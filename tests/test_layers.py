"""The package's import order: a module imports only modules that come before it.

The order is also the reading order (README, docs/tour.md):

    ground floor   files, config, images
    the paper      text, vae, masks, attention, decoding, transformer, sampling, clip, editing,
                   rerank
    data/          imports the ground floor only
    assembly       checkpoint, codes, evaluation, recommend, planning, pipeline
    training/      never the pipeline
    apps/          programs on top of the pipeline
    cli            the command line

Every import counts, wherever it stands: at module level, inside a function, under
``if TYPE_CHECKING:``. Imports of dalle1 modules inside functions are allowed only in
cli.py, and there only of training/ (Lightning) and apps/ui (gradio).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dalle1"

# module -> its place; a tuple sorts the files inside a wing by their own order
ORDER: dict[str, tuple[int, ...]] = {
    "files": (1,),
    "config": (2,),
    "images": (3,),
    "text": (4,),
    "vae": (5,),
    "masks": (6,),
    "attention": (6, 5),
    "decoding": (6, 6),  # the cached decode step, over the weights transformer hands it
    "transformer": (7,),
    "sampling": (8,),
    "clip": (9,),
    "editing": (10,),
    "rerank": (11,),
    "data.shapes": (12, 0),
    "data.emoji": (12, 0),
    "data.colours": (12, 3),
    "data.detect": (12, 1),
    "data.glyphs": (12, 0),
    "data.problems": (12, 1),
    "data.captions": (12, 2),
    "data.folder": (12, 3),
    "data.manifest": (12, 3),
    "data.shards": (12, 4),
    "data.sources": (12, 5),
    "data.check": (12, 6),
    "data": (12, 9),  # the face, dalle1/data/__init__.py
    "checkpoint": (13,),
    "codes": (14,),
    "evaluation": (15,),
    "recommend": (15, 5),
    "planning": (15, 5),
    "pipeline": (16,),
    "": (16, 9),  # the face, dalle1/__init__.py
    "training.allocator": (17, 1),
    "training.resilience": (17, 1),
    "training.sharding": (17, 1),
    "training.precision": (17, 1),
    "training.systems": (17, 2),
    "training.datamodule": (17, 2),
    "training.throughput": (17, 2),
    "training.watch": (17, 2),
    "training.fit": (17, 3),
    "training": (17, 9),
    "apps.evaluate": (18, 1),
    "apps.synth": (18, 1),
    "apps.explain.figures": (18, 1, 1),
    "apps.explain.stream": (18, 1, 2),
    "apps.explain.attention": (18, 1, 2),
    "apps.explain.tokens": (18, 1, 2),
    "apps.explain.generation": (18, 1, 2),
    "apps.explain.curves": (18, 1, 2),
    "apps.explain.tour": (18, 1, 3),
    "apps.explain": (18, 1, 9),  # the face, dalle1/apps/explain/__init__.py
    "apps.ui": (18, 1),
    "apps.compose": (18, 1),
    "apps": (18, 9),
    "cli": (19,),
}
GROUND_FLOOR = {"config", "files", "images"}
IN_FUNCTION_OK = {"cli": {"training", "apps.ui"}}


def module_name(path: Path) -> str:
    """dalle1/data/folder.py -> 'data.folder'; dalle1/data/__init__.py -> 'data'."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def targets(node: ast.ImportFrom | ast.Import, importer: str, is_package: bool) -> list[str]:
    """The dalle1 modules an import statement loads ('' is dalle1/__init__.py)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names if a.name == "dalle1" or a.name.startswith("dalle1.")]
        return [n.removeprefix("dalle1").lstrip(".") for n in names]
    if node.level == 0:
        if node.module != "dalle1" and not (node.module or "").startswith("dalle1."):
            return []
        base = node.module.removeprefix("dalle1").lstrip(".")
    else:
        package = importer.split(".") if is_package else importer.split(".")[:-1]
        package = [p for p in package if p]
        if node.level - 1 > len(package):
            return ["<outside dalle1>"]
        package = package[: len(package) - (node.level - 1)]
        base = ".".join([*package, *([node.module] if node.module else [])])
    found = []
    for alias in node.names:  # `from . import editing` loads the module dalle1.editing
        sub = f"{base}.{alias.name}" if base else alias.name
        found.append(sub if sub in ORDER else base)
    return found


def place(name: str) -> tuple[int, ...] | None:
    while name not in ORDER and "." in name:
        name = name.rsplit(".", 1)[0]
    return ORDER.get(name)


def violations(importer: str, source: str, filename: str, is_package: bool = False) -> list[str]:
    """Every import in ``source`` (module ``importer``) that breaks the rule, one line each."""
    mine = place(importer)
    if mine is None:
        return [f"{filename}: module '{importer}' has no place in the declared order"]
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(child, ast.Import | ast.ImportFrom):
                for target in targets(child, importer, is_package):
                    problem = judge(importer, mine, target, in_function)
                    if problem:
                        found.append(f"{filename}:{child.lineno}: {problem}")
            visit(child, nested)

    visit(ast.parse(source, filename), False)
    return found


def in_wing(name: str, wing: str) -> bool:
    return name == wing or name.startswith(wing + ".")


def judge(importer: str, mine: tuple[int, ...], target: str, in_function: bool) -> str | None:
    theirs = place(target)
    shown = f"dalle1.{target}" if target else "dalle1"
    if theirs is None:
        return f"imports {shown}, which has no place in the declared order"
    where = f"{importer} (place {'.'.join(map(str, mine))}) imports {shown} (place {'.'.join(map(str, theirs))})"
    if in_function and not any(in_wing(target, ok) for ok in IN_FUNCTION_OK.get(importer, ())):
        return f"{where} inside a function; only cli.py may, and only training / apps.ui"
    if in_wing(importer, "data") and not (in_wing(target, "data") or target in GROUND_FLOOR):
        return f"{where}: data/ imports only the ground floor (files, config, images)"
    if in_wing(importer, "training") and target == "pipeline":
        return f"{where}: training/ never imports the pipeline"
    if importer.startswith(target + ".") or (target == "" and importer):
        return f"{where}: a module does not import its own package's face"
    if not theirs < mine:
        return f"{where}, which does not come before it"
    return None


def package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_place_and_every_place_a_module():
    names = {module_name(p) for p in package_files()}
    assert names == set(ORDER), (
        f"not in ORDER: {sorted(names - set(ORDER))}; no file: {sorted(set(ORDER) - names)}"
    )


def test_imports_follow_the_declared_order():
    problems = []
    for path in package_files():
        name = module_name(path)
        problems += violations(
            name, path.read_text(), str(path.relative_to(PACKAGE.parent)), path.stem == "__init__"
        )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "importer, source, expect",
    [
        ("vae", "from .pipeline import DALLEPipeline\n", "dalle1/vae.py:1: vae (place 5)"),
        ("vae", "import torch\n\n\ndef f():\n    from .config import VAEConfig\n", ":5: "),
        (
            "editing",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .pipeline import X\n",
            ":3: editing (place 10) imports dalle1.pipeline (place 16), which does not",
        ),
        ("data.folder", "from ..text import TextTokenizer\n", "data/ imports only the ground"),
        ("data.captions", "from .folder import find_pairs\n", "does not come before it"),
        ("training.fit", "from ..pipeline import DALLEPipeline\n", "never imports the pipeline"),
        ("codes", "from dalle1.pipeline import DALLEPipeline\n", "codes (place 14)"),
        ("clip", "from . import editing\n", "imports dalle1.editing (place 10)"),
        ("cli", "def f():\n    from .pipeline import DALLEPipeline\n", "inside a function"),
        ("pipeline", "from dalle1 import DALLEPipeline\n", "its own package's face"),
    ],
)
def test_a_planted_violation_is_caught_with_file_and_line(importer, source, expect):
    filename = "dalle1/" + importer.replace(".", "/") + ".py"
    found = violations(importer, source, filename)
    assert len(found) == 1 and found[0].startswith(filename) and expect in found[0], found


def test_allowed_imports_pass():
    assert violations("cli", "def f():\n    from .training import fit\n", "cli.py") == []
    assert violations("data.sources", "from .shapes import make_shapes_dataset\n", "x") == []
    assert violations("pipeline", "from .editing import region_cells\n", "x") == []
    assert violations("data", "from .folder import CaptionedFolder\n", "x", True) == []


def test_no_import_cycles():
    """Module-level and in-function imports together form no cycle (a strict order implies
    it; this checks the graph itself)."""
    graph: dict[str, set[str]] = {}
    for path in package_files():
        name = module_name(path)
        tree = ast.parse(path.read_text())
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= {t for t in targets(node, name, path.stem == "__init__") if t in ORDER}
        graph[name] = edges - {name}
    done: set[str] = set()

    def walk(node: str, stack: tuple[str, ...]) -> None:
        if node in stack:
            names = [f"dalle1.{n}" if n else "dalle1" for n in (*stack, node)]
            raise AssertionError("import cycle: " + " -> ".join(names))
        if node in done:
            return
        for nxt in graph.get(node, ()):
            walk(nxt, (*stack, node))
        done.add(node)

    for name in graph:
        walk(name, ())


def test_the_command_line_loads_lightning_only_to_train():
    code = "import sys, dalle1.cli, dalle1.codes; print('lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
