"""The layers of the lab and the evaluation (issue 22, item 8).

The lab package (``hallupatch/lab``: world, trainer, measurements) depends on the harness's API
(``hallupatch.eval.harness``, ``tasks``, ``models``), never on the command line (``hallupatch.eval.cli``
and the ``eval lab`` command, ``hallupatch.eval.lab``), which depends on both. ``eval lab`` never names a
benchmark: the tasks declare what the suite needs from them.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAB_MODULES = sorted(f"hallupatch.lab.{p.stem}" for p in (ROOT / "hallupatch" / "lab").glob("*.py")
                     if p.stem != "__init__")
# the command line, and its built-in model (which imports the lab's settings)
COMMAND_LINE = ("hallupatch.eval.cli", "hallupatch.eval.lab", "hallupatch.eval.embedded")
API = ("hallupatch.eval.harness", "hallupatch.eval.tasks", "hallupatch.eval.models", "hallupatch.eval.store")


def imported_modules(path: Path):
    """Every module an ``import`` anywhere in ``path`` names (function-local imports included), with
    ``from package import name`` counted as ``package.name`` too (``name`` may be a submodule)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def reaches_command_line(module: str) -> bool:
    # ``from hallupatch.eval import main, run`` is the command line too
    return module in COMMAND_LINE or module.startswith(tuple(m + "." for m in COMMAND_LINE)) \
        or module in ("hallupatch.eval.main", "hallupatch.eval.run")


@pytest.mark.parametrize("path", sorted((ROOT / "hallupatch" / "lab").glob("*.py")), ids=lambda p: p.name)
def test_the_lab_never_imports_the_command_line(path):
    found = [m for m in imported_modules(path) if reaches_command_line(m)]
    assert not found, f"{path.name} imports {found}: the lab may use the harness's API, not the command line"


def test_the_checker_sees_function_local_imports(tmp_path):
    """The check above can fail: it finds an import of the command line inside a function."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from hallupatch.eval import cli\n    import hallupatch.eval.lab\n")
    assert [m for m in imported_modules(module) if reaches_command_line(m)] == \
        ["hallupatch.eval.cli", "hallupatch.eval.lab"]


@pytest.mark.parametrize("name", [m.rsplit(".", 1)[1] for m in API])
def test_the_harness_api_never_imports_the_command_line(name):
    path = ROOT / "hallupatch" / "eval" / (name + ".py")
    paths = [path] if path.exists() else sorted((ROOT / "hallupatch" / "eval" / name).glob("*.py"))
    for p in paths:
        found = [m for m in imported_modules(p) if reaches_command_line(m)]
        assert not found, f"{p.name} imports {found}"


def test_eval_lab_does_not_import_the_cli_that_lists_it():
    """``python -m hallupatch.eval`` lists the suite; the suite gets the benchmark runner passed in."""
    found = [m for m in imported_modules(ROOT / "hallupatch" / "eval" / "lab.py") if m.startswith("hallupatch.eval.cli")]
    assert not found


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_importing_the_whole_lab_leaves_the_command_line_unimported():
    code = ("import importlib, sys\n"
            f"for m in {LAB_MODULES!r}: importlib.import_module(m)\n"
            f"print(sorted(m for m in {COMMAND_LINE!r} if m in sys.modules))\n")
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


ORDERS = {
    "cli first": ["hallupatch.eval.cli", "hallupatch.lab.measure", "hallupatch.eval.lab"],
    "eval lab first": ["hallupatch.eval.lab", "hallupatch.eval.cli", "hallupatch.lab.settings"],
    "built-in model first": ["hallupatch.eval.embedded", "hallupatch.eval.lab", "hallupatch.eval.cli"],
    "lab measure first": ["hallupatch.lab.measure", "hallupatch.eval.embedded", "hallupatch.eval.cli"],
    "harness first": ["hallupatch.eval.harness", "hallupatch.lab.settings", "hallupatch.eval.lab", "hallupatch.eval"],
    "package first": ["hallupatch.eval", "hallupatch.lab.train", "hallupatch.eval.tasks.pope", "hallupatch.eval.lab"],
}


def test_modules_import_in_any_order_in_a_fresh_interpreter():
    """One fresh interpreter per order (a cycle breaks only some orders), each also reaching the command
    line through the package's lazy ``hallupatch.eval.run``."""
    failures = {}
    for name, order in ORDERS.items():
        code = ("import importlib\n"
                f"for m in {order!r}: importlib.import_module(m)\n"
                "import hallupatch.eval\n"
                "from hallupatch.eval import cli, run, main\n"
                "assert run is cli.run and main is cli.main\n"
                "from hallupatch.eval import lab\n"
                "assert lab.variants is importlib.import_module('hallupatch.lab.settings').variants\n")
        done = _run(code)
        if done.returncode != 0:
            failures[name] = done.stderr.strip().splitlines()[-1:]
    assert not failures


def _string_constants(path: Path):
    return {node.value for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def test_eval_lab_names_no_benchmark():
    """No task name (``"pope"``), POPE split or task-specific score key is a string in ``eval/lab.py``:
    what the suite needs from a task is declared by the task (``Task.lab_*``)."""
    from hallupatch.eval.scoring import POPE_SPLITS
    from hallupatch.eval.tasks import registered_tasks

    names = set(registered_tasks()) | set(POPE_SPLITS) | {"CHAIRs", "CHAIRi", "--num-images"}
    assert not names & _string_constants(ROOT / "hallupatch" / "eval" / "lab.py")


def test_a_task_joins_the_lab_suite_by_declaring_it(monkeypatch):
    from hallupatch.eval import lab
    from hallupatch.eval import tasks as task_registry

    assert list(lab.lab_tasks()) == ["pope", "chair"]
    assert lab.lab_tasks()["chair"].lab_options == ("--num-images", "100")

    class Toy(task_registry.Task):
        name = "toy-lab"
        lab_options = ("--toy", "1")
        lab_data = "toy questions"

    monkeypatch.setitem(task_registry._REGISTRY, Toy.name, Toy)
    assert lab.lab_tasks()["toy-lab"] is Toy
    facts = {"dev_questions": None, "threshold": 0.5, "model": "m", "parameters": 1e6, "dtype": "float32",
             "device": "cpu", "threads": "1", "limit": None, "settings": {"none": {}}}
    data_line = next(line for line in lab.render_header(facts).splitlines() if line.startswith("data "))
    assert data_line.endswith("POPE (random, popular, adversarial) and CHAIR captions and toy questions")
