"""The layout stays readable: the modules import each other without a cycle (imports inside functions count)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULES = {p.stem: p for p in [*ROOT.glob("*.py"), *(ROOT / "tools").glob("*.py")]}


def imports(path: Path) -> set[str]:
    """The project's modules that `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_no_import_cycles():
    graph = {name: imports(path) - {name} for name, path in MODULES.items()}
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
    for path in ROOT.glob("*.py"):
        assert not imports(path) & tools, path.name
