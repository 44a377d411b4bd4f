"""The package's shape: imports go one way through the layers, no cycles, no oversized module without a
written reason, and nothing the project ships cites files outside the repository.

Layers, lowest first; a module may import from its own layer or lower ones, never higher, not even
inside a function:

    io, config, distributed, runs, memory, warnings_filter, stack  <-  data  <-  models  <-  train
        <-  {distill, compress, export}  <-  {recipe, pipeline, report}  <-  cli
"""

import ast
import re
from pathlib import Path
from typing import Dict, List, Set

PROJECT = Path(__file__).resolve().parents[1]
PACKAGE = PROJECT / "recsys_kd"
LAYERS = [
    {"io", "config", "distributed", "runs", "memory", "warnings_filter", "stack"},
    {"data"},
    {"models"},
    {"train"},
    {"distill", "compress", "export"},
    {"recipe", "pipeline", "report"},
    {"cli"},
]
MAX_LINES = 500
# a module over MAX_LINES says why at its top, in a docstring line starting with this
SIZE_REASON = "Longer than 500 lines because"


def module_name(path: Path) -> str:
    parts = path.relative_to(PROJECT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _nodes(tree: ast.AST, typing_only: bool):
    """Every node, or every node outside ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    for node in ast.iter_child_nodes(tree):
        if not typing_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        yield node
        yield from _nodes(node, typing_only)


def imports_of(name: str, typing_only: bool = True) -> Set[str]:
    """The package's modules ``name`` imports, at module level or inside functions; with
    ``typing_only`` False, without the imports made for annotations only."""
    found = set()
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in _nodes(ast.parse(MODULES[name].read_text()), typing_only):
        targets: List[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name and target != "recsys_kd" and not name.startswith(target + "."):
                found.add(target)
    return found


GRAPH = {name: imports_of(name) for name in MODULES}
RUNTIME_GRAPH = {name: imports_of(name, typing_only=False) for name in MODULES}


def layer(name: str) -> int:
    head = name.split(".")[1]
    for index, members in enumerate(LAYERS):
        if head in members:
            return index
    raise AssertionError(f"{name}: its area {head!r} has no layer; place it in LAYERS and docs/architecture.md")


def test_every_module_has_a_layer():
    for name in MODULES:
        if name != "recsys_kd":
            layer(name)


def test_no_import_goes_up_a_layer():
    upward = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() if name != "recsys_kd"
                    for target in targets if layer(target) > layer(name))
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules_or_areas():
    """Between areas (``recsys_kd.X``), no cycle at all; between modules, none at run time (a module may
    name another's type in an annotation under ``if TYPE_CHECKING:``, downward or within its area)."""
    def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
        found, state = [], {}

        def visit(node: str, path: List[str]) -> None:
            state[node] = "open"
            for nxt in sorted(graph.get(node, ())):
                if state.get(nxt) == "open":
                    found.append(path[path.index(nxt):] + [nxt])
                elif nxt not in state:
                    visit(nxt, path + [nxt])
            state[node] = "done"

        for node in sorted(graph):
            if node not in state:
                visit(node, [node])
        return found

    areas: Dict[str, Set[str]] = {}
    for name, targets in GRAPH.items():  # annotations included
        for target in targets:
            a, b = ".".join(name.split(".")[:2]), ".".join(target.split(".")[:2])
            if a != b:
                areas.setdefault(a, set()).add(b)
    for graph in (RUNTIME_GRAPH, areas):
        found = cycles(graph)
        assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The walk above must see an import hidden in a function, or it would pass on a lazy cycle."""
    hidden = imports_of("recsys_kd.distill.task")
    assert "recsys_kd.train.trainer" in hidden and "recsys_kd.distill.losses" in hidden
    source = "def f():\n    from recsys_kd.compress.surgery import x\n"
    names = [n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)]
    assert names == ["recsys_kd.compress.surgery"]


def test_no_module_over_the_size_limit_without_a_reason():
    oversized = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        if len(lines) > MAX_LINES and SIZE_REASON not in docstring:
            oversized.append(f"{path.relative_to(PROJECT)}: {len(lines)} lines")
    assert not oversized, f"modules over {MAX_LINES} lines without '{SIZE_REASON} ...' in their docstring: {oversized}"


def test_nothing_shipped_cites_files_outside_the_repository():
    """Code, tools, configs and docs must carry what a reader needs: no paths into the workspace around
    the checkout (the tests alone read the sample data there, through conftest.py)."""
    outside = re.compile(r"\.\./shared|STACK\.md|DESIGN\.md")
    shipped = [*PACKAGE.rglob("*.py"), *(PROJECT / "tools").rglob("*.py"), *(PROJECT / "tools").rglob("*.sh"),
               *(PROJECT / "configs").glob("*.yaml"), *(PROJECT / "docs").glob("*.md"), *(PROJECT / "launch").glob("*"),
               PROJECT / "README.md"]
    cited = [f"{path.relative_to(PROJECT)}:{number}" for path in shipped if path.is_file()
             for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if outside.search(line)]
    assert not cited, f"references to files outside the repository: {cited}"


def test_readme_map_links_every_doc():
    readme = (PROJECT / "README.md").read_text()
    for doc in sorted((PROJECT / "docs").glob("*.md")):
        assert f"docs/{doc.name}" in readme, f"README's map does not link docs/{doc.name}"
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", readme):
        assert (PROJECT / target).exists(), f"README links {target}, which does not exist"


COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "all_gather_into_tensor", "broadcast",
               "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "gather",
               "gather_object", "scatter", "scatter_object_list", "barrier", "all_to_all", "all_to_all_single",
               "send", "recv", "isend", "irecv"}


def collective_calls(source: str) -> List[str]:
    """``torch.distributed`` collectives that ``source`` calls or imports: ``dist.X(...)`` for any
    alias of ``torch.distributed``, ``torch.distributed.X(...)``, and ``from torch.distributed import X``."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update(alias.asname for alias in node.names if alias.name == "torch.distributed" and alias.asname)
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found.extend(alias.name for alias in node.names if alias.name in COLLECTIVES)
            aliases.update(alias.asname or alias.name for alias in node.names if alias.name == "distributed")
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases.update(alias.asname or alias.name for alias in node.names if alias.name == "distributed")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append(ast.unparse(node))
    return found


def test_only_the_distributed_module_calls_collectives():
    """NCCL reduces CUDA tensors only: recsys_kd.distributed moves every collective's tensors to the
    collective device, so no other module may call one itself."""
    calls = {name: collective_calls(path.read_text()) for name, path in MODULES.items() if name != "recsys_kd.distributed"}
    assert not {name: found for name, found in calls.items() if found}, "collectives outside recsys_kd.distributed"


def test_the_collective_checker_sees_every_spelling():
    source = ("import torch.distributed as d\nfrom torch import distributed\nfrom torch.distributed import barrier\n"
              "d.all_reduce(x)\ndistributed.broadcast(x, 0)\ntorch.distributed.all_gather(a, b)\nd.get_rank()\n")
    assert sorted(collective_calls(source)) == sorted(["barrier", "d.all_reduce", "distributed.broadcast",
                                                        "torch.distributed.all_gather"])
