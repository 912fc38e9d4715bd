"""Layering rules of the package (docs/architecture.md), checked on the source: one owner per
contract, imports that flow one way, no import circle."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medseg"
OUTPUT_SUFFIXES = ("_mask.nii.gz", "_prob.nii.gz", "_lesions.nii.gz", "_lesions.csv", "_complete.json")


def module_files() -> dict[str, Path]:
    files = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        files[name.removesuffix(".__init__")] = path
    return files


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """medseg modules ``path`` imports anywhere (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(path, modules) - {name} for name, path in modules.items()}


def test_output_file_names_have_one_owner():
    offenders = [f"{name}: {suffix}" for name, path in module_files().items() if name != "medseg.outputs"
                 for suffix in OUTPUT_SUFFIXES if suffix in path.read_text(encoding="utf-8")]  # fmt: skip
    assert not offenders, "spell output names through medseg.outputs: " + ", ".join(offenders)


def test_one_atomic_writer():
    offenders = [name for name, path in module_files().items() if name != "medseg.atomic"
                 and any(call in path.read_text(encoding="utf-8") for call in ("os.replace(", "mkstemp(", "tmp.replace("))]  # fmt: skip
    assert not offenders, "write outputs through medseg.atomic.atomic_path: " + ", ".join(offenders)


@pytest.mark.parametrize(("importer", "imported"), [("medseg.engine", "medseg.inference"), ("medseg.io", "medseg.config"),
                                                    ("medseg.prediction", "medseg.inference"), ("medseg.runtime", "medseg.engine"),
                                                    ("medseg.runtime", "medseg.inference")])  # fmt: skip
def test_layers_do_not_import_upwards(importer, imported):
    graph = import_graph()
    offenders = [f"{a} -> {b}" for a, targets in graph.items() if a == importer or a.startswith(importer + ".")
                 for b in targets if b == imported or b.startswith(imported + ".")]  # fmt: skip
    assert not offenders, offenders


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state[target] == 1:
                cycles.append(stack[stack.index(target):] + [target])
            elif state[target] == 0:
                visit(target)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if state[name] == 0:
            visit(name)
    assert not cycles, [" -> ".join(c) for c in cycles]


def test_loading_a_config_does_not_import_torch():
    code = ("import sys; from medseg.config import load_config, ModelConfig; load_config(None); "
            "ModelConfig(arch='deeplabv3plus', encoder='resnet18', width=0.5); print('torch' in sys.modules)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
