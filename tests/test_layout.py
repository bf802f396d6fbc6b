"""The layout stays readable: the modules import each other without a cycle (imports inside functions count)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each module, and the checkpoint package as one: its files.
MODULES = {p.stem: [p] for p in [*ROOT.glob("*.py"), *(ROOT / "tools").glob("*.py")]}
MODULES["checkpoint"] = sorted((ROOT / "checkpoint").glob("*.py"))


def imports(paths: list[Path]) -> set[str]:
    """The project's modules that the files import, anywhere in them."""
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_no_import_cycles():
    graph = {name: imports(paths) - {name} for name, paths in MODULES.items()}
    assert graph["model"] <= {"kernels"} and not graph["kernels"]  # the network and its fast paths at the bottom
    done, path = set(), []

    def visit(name):
        assert name not in path, "import cycle: " + " -> ".join(path[path.index(name):] + [name])
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_the_core_does_not_import_the_tools():
    tools = {p.stem for p in (ROOT / "tools").glob("*.py")}
    for path in [*ROOT.glob("*.py"), *(ROOT / "checkpoint").glob("*.py")]:
        assert not imports([path]) & tools, path.name


def test_readme_line_counts_are_current():
    """README's "what is where" table gives each core file's size; a count off by more than 10% is stale."""
    import re
    rows = re.findall(r"^\| `([\w/.]+)` \| (\d[\d,]*) \|", (ROOT / "README.md").read_text(), re.M)
    assert len(rows) >= 6
    for name, quoted in rows:
        path = ROOT / name
        files = sorted(path.glob("*.py")) if path.is_dir() else [path]
        actual = sum(len(f.read_text().splitlines()) for f in files)
        assert abs(actual - int(quoted.replace(",", ""))) <= 0.1 * actual, f"{name}: README says {quoted}, it has {actual}"
