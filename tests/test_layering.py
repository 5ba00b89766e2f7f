"""The package's imports run one way (any import, top-level or inside a function), and importing
`tritonjac` has no side effect beyond defining the opaque operators."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"tritonjac": ROOT / "tritonjac", "tritonjac.kernels": ROOT / "kernels"}

# From the bottom up: a module may import only modules of its own layer or below.
LAYERS = [
    {"tritonjac.activations", "tritonjac.precision", "tritonjac.grad_mode", "tritonjac.encoding"},
    {"tritonjac.network"},
    {
        "tritonjac.kernels",
        "tritonjac.kernels.activations",
        "tritonjac.kernels.forward",
        "tritonjac.kernels.backward",
        "tritonjac.kernels.reverse",
    },
    {
        "tritonjac.torch_engine",
        "tritonjac.torch_engine.common",
        "tritonjac.torch_engine.forward_mode",
        "tritonjac.torch_engine.reverse_mode",
        "tritonjac.torch_engine.second_order",
        "tritonjac.triton_engine",
        "tritonjac.triton_engine.tuning",
        "tritonjac.triton_engine.registry",
        "tritonjac.triton_engine.launch",
        "tritonjac.triton_engine.guards",
        "tritonjac.triton_engine.plans",
        "tritonjac.triton_engine.forward",
        "tritonjac.triton_engine.backward",
        "tritonjac.triton_engine.reverse",
        "tritonjac.triton_engine.second_order",
    },
    {
        "tritonjac.ops",
        "tritonjac.ops.common",
        "tritonjac.ops.opaque",
        "tritonjac.ops.traced",
        "tritonjac.ops.second_order",
    },
    {"tritonjac.functional"},
    {"tritonjac.module"},
    {"tritonjac.init"},
    {"tritonjac", "tritonjac.benchmark", "tritonjac.aot", "tritonjac.__main__"},
]


def modules():
    found = {}
    for package, directory in PACKAGES.items():
        for path in directory.rglob("*.py"):
            parts = list(path.relative_to(directory).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known) -> set:
    """Every tritonjac module `name` imports, wherever the import statement is."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    # a module's parent packages are imported before it by Python itself: not a dependency
    return {t for t in out if not name.startswith(t + ".")}


def test_every_module_has_a_layer():
    placed = set().union(*LAYERS)
    assert set(modules()) == placed


@pytest.mark.parametrize("name", sorted(set().union(*LAYERS)))
def test_imports_point_down(name):
    found = modules()
    layer_of = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    upward = {m for m in imports_of(name, found[name], found) if layer_of[m] > layer_of[name]}
    assert not upward, f"{name} imports {sorted(upward)} from a higher layer"


def test_no_import_cycle():
    found = modules()
    graph = {name: imports_of(name, path, found) for name, path in found.items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph[node]:
            if state.get(nxt) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_every_package_is_installed():
    """A regular (not editable) install ships exactly the packages pyproject.toml lists."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert packages == listed


def test_every_planted_bug_still_has_its_line():
    """dev/plant_bugs.py replaces one exact piece of source per bug: a refactor that changes that
    piece would leave the bug unplantable (the script stops), so each must occur exactly once."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("plant_bugs", ROOT / "dev" / "plant_bugs.py")
    plant_bugs = importlib.util.module_from_spec(spec)
    sys.modules["plant_bugs"] = plant_bugs  # its dataclass looks its module up there
    spec.loader.exec_module(plant_bugs)
    for bug in plant_bugs.BUGS:
        count = (ROOT / bug.path).read_text().count(bug.old)
        assert count == 1, f"{bug.name}: its text occurs {count} times in {bug.path}"
