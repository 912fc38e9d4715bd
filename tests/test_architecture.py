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
    patterns = {file: re.compile(rf"(?<![\w.-]){re.escape(file)}(?![\w-])") for file in files}
    offenders += [f"{name}: {file}" for name, path in module_files().items() if name != "medseg.outputs"
                  for file, pattern in patterns.items() if any(pattern.search(text) for text in code_strings(path))]  # fmt: skip
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


def layer_table_names() -> set[str]:
    """The code names (between backticks) of docs/architecture.md's layer table."""
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = text.split("| layer | modules | job |", 1)[1].split("\n\n", 1)[0]
    return set(re.findall(r"`([^`]+)`", rows))


def test_every_module_is_in_the_layer_table():
    """Each module file of medseg/ is named in the layer table as ``name.py``; each package by
    its folder (``engine/``, or ``commands/*.py``), which covers every module under it."""
    named = layer_table_names()
    folders = {name.split("/", 1)[0] for name in named if "/" in name}
    missing = [path.name for path in sorted(PACKAGE.glob("*.py"))
               if not path.name.startswith("__") and path.name not in named]  # fmt: skip
    missing += [f"{path.name}/" for path in sorted(PACKAGE.iterdir())
                if (path / "__init__.py").is_file() and path.name not in folders]  # fmt: skip
    assert not missing, "add to the layer table of docs/architecture.md: " + ", ".join(missing)
