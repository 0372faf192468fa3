"""The folder layout is the architecture: subpackages import each other without cycles, and the names of
particular architectures' modules stay in the code written for those architectures."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "subspace"
# the family adapters, the model code of one architecture, and the organisms built for particular architectures
ARCHITECTURE_SPECIFIC = ("families/", "models/llada/", "organisms/")
MODULE_NAMES = re.compile(r"\b(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|gate_up_proj|c_attn|c_fc)\b")


def subpackage_imports() -> dict[str, dict[str, list[str]]]:
    """subpackage → imported subpackage → the files importing it (function-level imports included)."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            continue  # top-level modules (config, pipeline) wire the subpackages together
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                bits = name.split(".")
                if bits[0] == "subspace" and len(bits) > 1 and bits[1] != parts[0] and (PACKAGE / bits[1]).is_dir():
                    graph.setdefault(parts[0], {}).setdefault(bits[1], []).append(str(path.relative_to(PACKAGE)))
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in graph.get(node, {}):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}, "c": {"a": []}}) is None


def test_subpackages_import_each_other_without_cycles():
    graph = subpackage_imports()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle " + " -> ".join(cycle) + ": " + "; ".join(
        f"{a} -> {b} in {sorted(set(graph[a][b]))}" for a, b in zip(cycle, cycle[1:]))


def test_organism_building_lives_in_its_own_package():
    graph = subpackage_imports()
    for package in ("models", "training", "evaluation", "objectives", "methods"):
        assert "organisms" not in graph.get(package, {}), f"{package} imports organisms: {graph[package]['organisms']}"


def test_module_names_appear_only_in_architecture_specific_code():
    found = [f"{path.relative_to(PACKAGE)}: {m.group(0)}" for path in sorted(PACKAGE.rglob("*.py"))
             if not str(path.relative_to(PACKAGE)).startswith(ARCHITECTURE_SPECIFIC)
             for m in MODULE_NAMES.finditer(path.read_text())]
    assert not found, found
