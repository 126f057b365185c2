"""The import contract: transferkit's layers import one way, and no module imports in a circle.

Every module of `src/transferkit` is parsed (not imported), and every import in it counts:
module-level ones, the ones inside functions, `if TYPE_CHECKING:` ones and
`importlib.import_module("transferkit....")` with a constant name. `LAYERS` declares the order,
bottom first; docs/architecture.md explains it. A failure names the file, the line and the rule.

The checker is tested on small synthetic packages first, so that it cannot pass by finding
nothing.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Layers bottom first. Each layer is a sequence of tiers, bottom first; a tier holds slots that
# are independent of each other (a slot is a module, or a subpackage taken as a whole). A module
# may import from its own slot, from a lower tier of its own layer and from any lower layer.
Layers = Sequence[tuple[str, Sequence[Sequence[str]]]]

LAYERS: Layers = (
    ("foundation", (("transferkit._version", "transferkit.errors"),)),
    (
        "utils",
        (
            (
                "transferkit._utils.batches",
                "transferkit._utils.checks",
                "transferkit._utils.configs",
                "transferkit._utils.figures",
                "transferkit._utils.files",
            ),
        ),
    ),
    (
        "backend",
        (
            ("transferkit.backend",),
            (
                "transferkit.backend.jax",
                "transferkit.backend.tensorflow",
                "transferkit.backend.torch",
            ),
        ),
    ),
    (
        "model",
        (
            (
                "transferkit.model.dropout",
                "transferkit.model.graph",
                "transferkit.model.keras2.ops",
                "transferkit.model.keras2.safety",
            ),
            ("transferkit.model.keras2.layers", "transferkit.model.layers"),
            ("transferkit.model.keras2.config",),
            ("transferkit.model.keras2.files",),
            ("transferkit.model.heads", "transferkit.model.loading"),
        ),
    ),
    ("data", (("transferkit.data.checks",),)),
    (
        "compile",
        (
            ("transferkit.compile.lr_groups",),
            ("transferkit.compile.spec",),
            ("transferkit.compile.state",),
        ),
    ),
    (
        "recipes",
        (
            (
                "transferkit.recipes.batchnorm",
                "transferkit.recipes.lora",
                "transferkit.recipes.lr_finder",
            ),
        ),
    ),
    (
        "results",
        (
            ("transferkit.results.summary",),
            ("transferkit.results.plotting", "transferkit.results.provenance"),
            ("transferkit.results.result",),
        ),
    ),
    (
        "train",
        (
            (
                "transferkit.train.checkpoints",
                "transferkit.train.distribution",
                "transferkit.train.executor",
                "transferkit.train.sharding",
            ),
            (
                "transferkit.train.cache",
                "transferkit.train.callbacks",
                "transferkit.train.guards",
                "transferkit.train.phases",
            ),
            ("transferkit.train.fit",),
        ),
    ),
    ("facade", (("transferkit.tuner",),)),
    (
        "public modules and entry points",
        (
            # The documented modules at their old paths, re-exporting from their homes.
            ("transferkit.callbacks", "transferkit.distribution", "transferkit.keras2"),
            ("transferkit",),
            ("transferkit.demo",),
            ("transferkit.cli",),  # `transferkit demo` runs the demo module
            ("transferkit.__main__",),
        ),
    ),
)

# A subpackage that is one slot of LAYERS still imports one way inside: the feature cache's
# modules, bottom first (its `__init__` docstring explains each).
CACHE = "transferkit.train.cache"
CACHE_LAYERS: Layers = (
    (
        "train.cache",
        (
            tuple(f"{CACHE}.{m}" for m in ("bridge", "errors", "layers", "pipeline", "store")),
            (f"{CACHE}.eligibility", f"{CACHE}.plan"),
            (f"{CACHE}.extract", f"{CACHE}.suffix"),
            (f"{CACHE}.executor",),
        ),
    ),
)

# The checkpoint directory's modules, bottom first (its `__init__` docstring explains each).
CHECKPOINTS = "transferkit.train.checkpoints"
CHECKPOINTS_LAYERS: Layers = (
    (
        "train.checkpoints",
        (
            (f"{CHECKPOINTS}.lock", f"{CHECKPOINTS}.records"),
            tuple(f"{CHECKPOINTS}.{m}" for m in ("fingerprint", "manifest", "state")),
            (f"{CHECKPOINTS}.store",),
        ),
    ),
)


@dataclass(frozen=True)
class Edge:
    """One import: `source` imports `target`; `eager` when it runs as `source` is imported."""

    source: str
    target: str
    line: int
    eager: bool


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def find_modules(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under `root` (a `src` folder), by dotted name."""
    return {_module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _raw_imports(tree: ast.Module) -> Iterator[tuple[ast.AST, bool]]:
    """Every import-like node, and whether it runs at import time of the module."""

    def walk(node: ast.AST, eager: bool) -> Iterator[tuple[ast.AST, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom, ast.Call)):
                yield child, eager
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from walk(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), False)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), eager)
            else:
                yield from walk(child, eager)

    yield from walk(tree, True)


def _known(name: str, modules: Mapping[str, Path]) -> str:
    """`name`, or its longest prefix that is a module (`pkg.mod.Class` -> `pkg.mod`)."""
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def import_edges(source: str, path: Path, modules: Mapping[str, Path], package: str) -> list[Edge]:
    """The imports of one module that point into `package`."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    targets: list[tuple[str, int, bool]] = []
    for node, eager in _raw_imports(tree):
        if isinstance(node, ast.Import):
            targets += [(alias.name, node.lineno, eager) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = source.split(".") if is_package else source.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.append((sub if sub in modules else base, node.lineno, eager))
        elif isinstance(node, ast.Call):
            func = node.func
            if (
                isinstance(func, ast.Attribute)
                and func.attr == "import_module"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                targets.append((node.args[0].value, node.lineno, False))
    return [
        Edge(source, _known(name, modules), line, eager)
        for name, line, eager in targets
        if (name == package or name.startswith(package + ".")) and _known(name, modules) != source
    ]


def all_edges(root: Path, package: str) -> tuple[dict[str, Path], list[Edge]]:
    modules = find_modules(root, package)
    edges = [
        e for name, path in modules.items() for e in import_edges(name, path, modules, package)
    ]
    return modules, edges


def _slot_of(module: str, layers: Layers, root_package: str) -> tuple[int, int, str] | None:
    best: tuple[int, int, str] | None = None
    for li, (_, tiers) in enumerate(layers):
        for ti, tier in enumerate(tiers):
            for slot in tier:
                covers = module == slot or (slot != root_package and module.startswith(slot + "."))
                if covers and (best is None or len(slot) > len(best[2])):
                    best = (li, ti, slot)
    return best


def layer_violations(
    modules: Mapping[str, Path], edges: Sequence[Edge], layers: Layers, package: str
) -> list[str]:
    """Imports that run against `layers`, and modules or slots the declaration gets wrong."""
    problems: list[str] = []
    declared = {slot for _, tiers in layers for tier in tiers for slot in tier}
    for slot in sorted(declared):
        if not any(m == slot or m.startswith(slot + ".") for m in modules):
            problems.append(f"LAYERS names {slot}, which is not a module: update LAYERS")
    importing = {e.source for e in edges}
    for name, path in modules.items():
        if _slot_of(name, layers, package) is not None:
            continue
        if path.name == "__init__.py" and name not in importing:
            continue  # an empty subpackage `__init__`: it adds no edge
        problems.append(f"{name} ({path.name}) is in no layer: add it to LAYERS")
    for e in edges:
        src, dst = _slot_of(e.source, layers, package), _slot_of(e.target, layers, package)
        if src is None or dst is None or src[2] == dst[2]:
            continue
        where = f"{modules[e.source]}:{e.line}: {e.source} imports {e.target}"
        if dst[0] > src[0]:
            problems.append(
                f"{where}: layer {layers[src[0]][0]!r} imports the higher layer "
                f"{layers[dst[0]][0]!r}"
            )
        elif dst[0] == src[0] and dst[1] > src[1]:
            problems.append(f"{where}: an upward import inside layer {layers[src[0]][0]!r}")
        elif dst[0] == src[0] and dst[1] == src[1]:
            problems.append(
                f"{where}: {src[2]} and {dst[2]} are independent siblings in layer "
                f"{layers[src[0]][0]!r}"
            )
    return problems


def find_cycle(edges: Sequence[Edge]) -> list[str] | None:
    """One import cycle among `edges` as [a, b, ..., a], or None."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


# --- the checker, on synthetic packages -------------------------------------------------------


def _package(tmp_path: Path, files: Mapping[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return tmp_path


TOY_LAYERS: Layers = (
    ("low", (("pkg.base",), ("pkg.low.a", "pkg.low.b"))),
    ("high", (("pkg.high",),)),
    ("top", (("pkg",),)),
)

TOY_CLEAN = {
    "__init__.py": "from pkg import high\n",
    "base.py": "X = 1\n",
    "low/__init__.py": '"""Empty."""\n',
    "low/a.py": "from pkg.base import X\n",
    "low/b.py": "from .. import base\n",
    "high.py": "from pkg.low import a, b\nimport pkg.base\n",
}


def test_checker_accepts_a_clean_package_and_resolves_every_import_form(tmp_path: Path) -> None:
    root = _package(tmp_path, TOY_CLEAN)
    modules, edges = all_edges(root, "pkg")
    assert {(e.source, e.target) for e in edges} == {
        ("pkg", "pkg.high"),
        ("pkg.low.a", "pkg.base"),
        ("pkg.low.b", "pkg.base"),  # relative import of a submodule
        ("pkg.high", "pkg.low.a"),  # `from package import submodule`
        ("pkg.high", "pkg.low.b"),
        ("pkg.high", "pkg.base"),
    }
    assert layer_violations(modules, edges, TOY_LAYERS, "pkg") == []
    assert find_cycle(edges) is None


@pytest.mark.parametrize(
    ("path", "text", "expected"),
    [
        # Inside a function: still an upward import.
        (
            "low/a.py",
            "def f():\n    from pkg.high import Y\n",
            "'low' imports the higher layer 'high'",
        ),
        # Under TYPE_CHECKING.
        (
            "base.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.low.a\n",
            "an upward import inside layer 'low'",
        ),
        # Siblings of one tier.
        (
            "low/a.py",
            "from pkg.low.b import Z\n",
            "pkg.low.a and pkg.low.b are independent siblings",
        ),
        # By name, through importlib.
        (
            "low/b.py",
            "import importlib\nm = importlib.import_module('pkg.high')\n",
            "'low' imports the higher layer 'high'",
        ),
        # A relative import that climbs.
        ("low/a.py", "from ..high import Y\n", "'low' imports the higher layer 'high'"),
        # A new module nobody placed.
        ("extra.py", "import pkg.base\n", "pkg.extra (extra.py) is in no layer"),
    ],
)
def test_checker_reports_each_kind_of_violation(
    tmp_path: Path, path: str, text: str, expected: str
) -> None:
    root = _package(tmp_path, {**TOY_CLEAN, path: text})
    modules, edges = all_edges(root, "pkg")
    problems = layer_violations(modules, edges, TOY_LAYERS, "pkg")
    assert len(problems) == 1 and expected in problems[0], problems


def test_checker_reports_a_stale_declaration(tmp_path: Path) -> None:
    root = _package(tmp_path, TOY_CLEAN)
    modules, edges = all_edges(root, "pkg")
    layers = (*TOY_LAYERS, ("gone", (("pkg.removed",),)))
    assert layer_violations(modules, edges, layers, "pkg") == [
        "LAYERS names pkg.removed, which is not a module: update LAYERS"
    ]


def test_checker_finds_cycles_eager_and_lazy(tmp_path: Path) -> None:
    root = _package(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.b import B\nA = 1\n",
            "b.py": "B = 2\ndef f():\n    from pkg.c import C\n",
            "c.py": "import pkg.a\nC = 3\n",
        },
    )
    _, edges = all_edges(root, "pkg")
    assert find_cycle(edges) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    assert find_cycle([e for e in edges if e.eager]) is None  # the circle closes in a function


# --- the contract on transferkit ----------------------------------------------------------------


def test_transferkit_layers_import_downward_only() -> None:
    modules, edges = all_edges(SRC, "transferkit")
    assert len(modules) > 40 and len(edges) > 100  # the walk saw the package
    assert layer_violations(modules, edges, LAYERS, "transferkit") == []


@pytest.mark.parametrize(
    ("package", "order", "at_least"),
    [(CACHE, CACHE_LAYERS, (10, 10)), (CHECKPOINTS, CHECKPOINTS_LAYERS, (6, 8))],
    ids=["cache", "checkpoints"],
)
def test_a_subpackage_imports_downward_only(
    package: str, order: Layers, at_least: tuple[int, int]
) -> None:
    modules, edges = all_edges(SRC, "transferkit")
    inside = {name: path for name, path in modules.items() if name.startswith(package + ".")}
    own = [e for e in edges if e.source in inside and e.target in inside]
    assert len(inside) >= at_least[0] and len(own) >= at_least[1]  # the walk saw it
    assert layer_violations(inside, own, order, package) == []


def test_transferkit_has_no_import_cycle() -> None:
    _, edges = all_edges(SRC, "transferkit")
    assert find_cycle([e for e in edges if e.eager]) is None, "a module-level circle"
    assert find_cycle(edges) is None, "a circle through function-level imports"


def test_subpackage_inits_import_nothing() -> None:
    """Importing one module of a layer never imports its siblings (`import transferkit` stays
    cheap and free of TensorFlow)."""
    modules = find_modules(SRC, "transferkit")
    inits = {
        name
        for name, path in modules.items()
        if path.name == "__init__.py"
        # The package itself, the public `keras2` module, and the backend seam, which is a
        # module of its own (it imports keras and picks its backend module lazily).
        and name not in ("transferkit", "transferkit.keras2", "transferkit.backend")
    }
    assert inits >= {
        "transferkit.model",
        "transferkit.train",
        "transferkit.train.cache",
        "transferkit.train.checkpoints",
        "transferkit._utils",
    }
    for name in inits:
        tree = ast.parse(modules[name].read_text(encoding="utf-8"))
        assert not [n for n, _ in _raw_imports(tree) if not isinstance(n, ast.Call)], name


# --- the public API did not move ---------------------------------------------------------------


def test_every_public_name_resolves_from_its_declared_home() -> None:
    import transferkit

    for name in transferkit.__all__:
        assert getattr(transferkit, name) is not None, name
    for name, module in transferkit._LAZY.items():
        assert getattr(importlib.import_module(module), name) is getattr(transferkit, name)
    assert transferkit.callbacks is importlib.import_module("transferkit.callbacks")


@pytest.mark.parametrize(
    ("public", "homes"),
    [
        ("transferkit.callbacks", ("transferkit.train.callbacks",)),
        (
            "transferkit.distribution",
            ("transferkit.train.distribution", "transferkit.train.sharding"),
        ),
    ],
)
def test_documented_modules_reexport_every_public_name(public: str, homes: tuple[str, ...]) -> None:
    old = importlib.import_module(public)
    found: list[str] = []
    for home in homes:
        new = importlib.import_module(home)
        for name in new.__all__:
            # A type alias (`Distribution`) is documented where it lives, not re-exported.
            if name[0].isupper() and not isinstance(getattr(new, name), type):
                continue
            assert getattr(old, name) is getattr(new, name), name
            found.append(name)
    assert sorted(old.__all__) == sorted(found)


# `transferkit.keras2`'s documented names, as before the split of `model/keras2.py`
# (`keras2_nested_config`, an alias of `keras2_config`, was removed).
KERAS2_NAMES = {
    "transferkit.model.keras2.safety": ("check_op_layers", "check_op_name"),
    "transferkit.model.keras2.layers": (
        "Keras2Lambda",
        "Keras2RandomCrop",
        "RandomHeight",
        "RandomWidth",
        "SlicingOpLambda",
        "TFOpLambda",
        "keras2_hard_sigmoid",
    ),
    "transferkit.model.keras2.config": ("keras2_config", "keras3_name"),
    "transferkit.model.keras2.files": (
        "h5_written_by_keras2",
        "is_keras2_failure",
        "load_keras2_h5",
        "load_keras2_keras",
        "written_by_keras2",
    ),
}


def test_the_keras2_module_reexports_its_names_from_the_keras2_package() -> None:
    public = importlib.import_module("transferkit.keras2")
    assert sorted(public.__all__) == sorted(n for names in KERAS2_NAMES.values() for n in names)
    for home, names in KERAS2_NAMES.items():
        module = importlib.import_module(home)
        for name in names:
            assert name in module.__all__, (home, name)
            assert getattr(public, name) is getattr(module, name), name


def test_registered_keras_names_are_unchanged() -> None:
    """Saved files name transferkit's classes by registered name, so they must not move."""
    import keras

    import transferkit.compile.lr_groups
    import transferkit.keras2

    registered = keras.saving.get_registered_name
    assert registered(transferkit.keras2.TFOpLambda) == "transferkit>TFOpLambda"
    assert registered(transferkit.keras2.SlicingOpLambda) == "transferkit>SlicingOpLambda"
    assert registered(transferkit.keras2.Keras2Lambda) == "transferkit>Keras2Lambda"
    assert registered(transferkit.keras2.keras2_hard_sigmoid) == "transferkit>keras2_hard_sigmoid"
    assert registered(transferkit.keras2.RandomHeight) == "transferkit>RandomHeight"
    assert registered(transferkit.keras2.RandomWidth) == "transferkit>RandomWidth"
    assert registered(transferkit.keras2.Keras2RandomCrop) == "transferkit>Keras2RandomCrop"
    assert registered(transferkit.compile.lr_groups.ScaledSchedule) == "transferkit>ScaledSchedule"


@pytest.mark.parametrize("old_module", ["transferkit.keras2", "transferkit.model.keras2"])
def test_a_file_saved_with_the_old_module_paths_still_loads(
    tmp_path: Path, old_module: str
) -> None:
    """A `.keras` file saved before the move records `module: transferkit.keras2` (one saved
    between the moves, `transferkit.model.keras2`); Keras finds the class by its registered
    name first, so the file still loads, with the same outputs."""
    import json
    import zipfile

    import keras
    import numpy as np

    from transferkit.model.keras2.layers import TFOpLambda

    inp = keras.Input((3,))
    out = TFOpLambda("math.abs", name="abs")(keras.layers.Dense(2, name="d")(inp))
    model = keras.Model(inp, out)
    new_file, old_file = tmp_path / "new.keras", tmp_path / "old.keras"
    model.save(new_file)
    with zipfile.ZipFile(new_file) as src, zipfile.ZipFile(old_file, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                text = data.decode("utf-8")
                assert '"transferkit.model.keras2.layers"' in text  # what a new file records
                data = text.replace('"transferkit.model.keras2.layers"', f'"{old_module}"').encode()
            dst.writestr(item, data)
    assert f'"{old_module}"' in json.dumps(
        json.loads(zipfile.ZipFile(old_file).read("config.json"))
    )
    restored = keras.saving.load_model(old_file)
    assert isinstance(restored.get_layer("abs"), TFOpLambda)
    x = np.array([[1.0, -2.0, 3.0]], dtype="float32")
    np.testing.assert_allclose(restored.predict(x, verbose=0), model.predict(x, verbose=0))
