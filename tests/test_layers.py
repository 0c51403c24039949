"""Layers only reach down: data_prep -> pretrain -> evaluation -> bench / quickstart.

A module may import from its own layer and those below it, never from one above (for example,
training must not import evaluation code: the FLOPs it logs are counted next to the models).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"data_prep": 0, "pretrain": 1, "evaluation": 2, "bench": 3, "quickstart": 3}


def _imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(LAYERS)


def _modules():
    for package in ("data_prep", "pretrain", "evaluation", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            yield package, path
    yield "quickstart", REPO / "quickstart.py"


def test_no_module_imports_from_a_layer_above_it():
    upward = [f"{path.relative_to(REPO)} imports {name}"
              for layer, path in _modules() for name in sorted(_imported_packages(path))
              if LAYERS[name] > LAYERS[layer]]
    assert not upward, upward


def test_the_check_sees_an_upward_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from evaluation.flops import param_count\n")
    assert _imported_packages(bad) == {"evaluation"}
