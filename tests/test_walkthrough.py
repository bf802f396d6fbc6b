"""walkthrough.md cannot rot: every `file.py::name` it cites exists, tests included."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = re.compile(r"`((?:tests/|tools/)?\w+\.py)::([\w.]+)`")


def defined_names(path: Path) -> set[str]:
    """Top-level functions and classes, and Class.method for methods."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
    return names


def test_every_cited_function_exists():
    text = (ROOT / "walkthrough.md").read_text()
    refs = REFERENCE.findall(text)
    assert len(refs) >= 30
    missing = [f"{f}::{n}" for f, n in refs if not (ROOT / f).exists() or n not in defined_names(ROOT / f)]
    assert not missing, missing


def test_readme_points_to_the_walkthrough():
    first_screen = "\n".join((ROOT / "README.md").read_text().splitlines()[:25])
    assert "walkthrough.md" in first_screen
