"""Layering rules of the package (docs/architecture.md), checked on the source: one owner per
contract, imports that flow one way, no import circle."""

from __future__ import annotations

import ast
import re
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


def code_strings(path: Path) -> list[str]:
    """The string constants of ``path``'s code (f-string parts included), docstrings left out."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}  # fmt: skip
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]  # fmt: skip


def owned_file_names() -> list[str]:
    """Every whole file name medseg.outputs defines (``last.pt``, ``config.yaml``, ...; the
    per-case suffixes are :data:`OUTPUT_SUFFIXES`)."""
    from medseg import outputs

    return sorted(value for key, value in vars(outputs).items()
                  if key.isupper() and isinstance(value, str) and "." in value and not value.startswith("_"))  # fmt: skip


def test_output_file_names_have_one_owner():
    offenders = [f"{name}: {suffix}" for name, path in module_files().items() if name != "medseg.outputs"
                 for suffix in OUTPUT_SUFFIXES if suffix in path.read_text(encoding="utf-8")]  # fmt: skip
    files = owned_file_names()
    assert {"last.pt", "best.pt", "config.yaml", "model.json", "postprocess.json"} <= set(files)
    # whole names: spelled in code (f-strings and messages included) only by medseg.outputs;
    # docstrings and comments may name them
    spelled = re.compile(r"(?<![\w.-])(" + "|".join(map(re.escape, files)) + r")(?![\w-])")
    offenders += [f"{name}: {match}" for name, path in module_files().items() if name != "medseg.outputs"
                  for match in sorted({m.group(1) for text in code_strings(path) for m in spelled.finditer(text)})]  # fmt: skip
    assert not offenders, "spell output names through medseg.outputs: " + ", ".join(offenders)


def test_postprocessing_keys_have_one_owner():
    from medseg.outputs import POSTPROCESS_RULE_KEYS

    offenders = [f"{name}:{node.lineno}" for name, path in module_files().items() if name != "medseg.outputs"
                 for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                 if isinstance(node, (ast.Tuple, ast.List, ast.Set))
                 and set(POSTPROCESS_RULE_KEYS) <= {e.value for e in node.elts if isinstance(e, ast.Constant)}]  # fmt: skip
    assert not offenders, "take the post-processing keys from medseg.outputs.POSTPROCESS_RULE_KEYS: " + ", ".join(offenders)


def test_one_atomic_writer():
    offenders = [name for name, path in module_files().items() if name != "medseg.atomic"
                 and any(call in path.read_text(encoding="utf-8") for call in ("os.replace(", "mkstemp(", "tmp.replace("))]  # fmt: skip
    assert not offenders, "write outputs through medseg.atomic.atomic_path: " + ", ".join(offenders)


def test_training_never_imports_batch_inference():
    """The engine's validation shares the per-volume path (``inference.predictor``,
    ``postprocess``, ``instances``) with ``medseg infer``, never the batch layer above it."""
    shared = {"medseg.inference", "medseg.inference.predictor", "medseg.inference.postprocess", "medseg.inference.instances"}
    offenders = [f"{a} -> {b}" for a, targets in import_graph().items() if a.startswith("medseg.engine")
                 for b in targets if b.startswith("medseg.inference") and b not in shared]  # fmt: skip
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


def test_cli_lists_every_command_module_even_one_that_fails_to_import(monkeypatch, capsys):
    """Every module of medseg/commands/ is a command of ``medseg --help``; one that cannot be
    imported stays listed with its import error, and running it prints that error, exit 1 (it
    used to vanish from the CLI without a word)."""
    from medseg import cli

    modules = {path.stem for path in (PACKAGE / "commands").glob("*.py") if path.stem != "__init__"}
    assert {path.removeprefix("medseg.commands.") for path in cli.COMMANDS.values()} == modules
    monkeypatch.setitem(sys.modules, "medseg.commands.synth", None)  # importing it now fails
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listed = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert re.search(rf"^\s+{re.escape(name)}\s", listed, re.MULTILINE), (name, listed)
    assert re.search(r"^\s+synth\s+\(unavailable\) cannot be loaded", listed, re.MULTILINE), listed
    assert cli.main(["synth", "--out", "anywhere"]) == 1
    err = capsys.readouterr().err
    assert "error: medseg synth cannot be loaded: medseg.commands.synth failed to import" in err, err


def layer_table() -> list[list[str]]:
    """docs/architecture.md's layer table, top layer first: per layer the code names between
    backticks that name a module (``name.py``, ``pkg/name.py``) or a package (``pkg/``,
    ``pkg/*.py``); other code words in the cells are prose."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = text.split("| layer | modules | job |", 1)[1].split("\n\n", 1)[0].strip().splitlines()[1:]
    return [[name for name in re.findall(r"`([^`]+)`", row.split("|")[2]) if name.endswith((".py", "/"))] for row in rows]


def layer_of(module: str, table: list[list[str]]) -> int | None:
    """The layer index (0 = top) of a dotted module: its own ``pkg/name.py`` entry, else the
    nearest package entry above it."""
    parts = module.split(".")[1:]
    entries = {}
    for index, names in enumerate(table):
        for name in names:
            entries[name.removesuffix("*.py")] = index
    own = "/".join(parts) + ".py"
    if own in entries:
        return entries[own]
    for depth in range(len(parts), 0, -1):
        package = "/".join(parts[:depth]) + "/"
        if package in entries:
            return entries[package]
    return None


def test_every_module_is_in_the_layer_table():
    """Each module of medseg/ has a layer: a flat module by its ``name.py`` entry, a module in a
    package by its own entry or its package's (``engine/``, ``commands/*.py``)."""
    table = layer_table()
    missing = [name for name in module_files() if name not in ("medseg", "medseg.__main__") and layer_of(name, table) is None]
    assert not missing, "add to the layer table of docs/architecture.md: " + ", ".join(missing)


def test_imports_follow_the_layer_table():
    """No module imports from a layer above its own (docs/architecture.md, top row highest)."""
    table = layer_table()
    names = ["entry points", "orchestrators", "shared compute", "contracts and primitives"]
    assert len(table) == len(names)
    offenders = []
    for importer, targets in import_graph().items():
        if importer in ("medseg", "medseg.__main__"):
            continue
        for target in targets:
            if target != "medseg" and layer_of(target, table) < layer_of(importer, table):
                offenders.append(f"{importer} ({names[layer_of(importer, table)]}) -> {target} ({names[layer_of(target, table)]})")
    assert not offenders, "imports running up the layer table:\n" + "\n".join(sorted(offenders))
