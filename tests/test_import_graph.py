"""The doors between the layers open one way, read from the source (ast; nothing is imported).

- webapp/ (Django) never reaches torch or the other training libraries, not even through a
  lazy import inside a function or through a worker module that imports them;
- worker/ (the training side) never imports Django, the web app (glue included), the benches or
  the tests;
- the glue (the Celery tasks beside the models they update: webapp/*/tasks.py) needs both, and
  nothing but Celery's discovery (by name) and the tests imports it;
- bench/ imports no test module, and no test imports bench/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("webapp", "worker", "bench", "tests")
TRAINING_LIBRARIES = (
    "torch", "transformers", "tokenizers", "peft", "sentence_transformers", "trl", "accelerate", "bitsandbytes",
    "safetensors", "gguf",
)
GLUE = ("webapp.jobs.tasks", "webapp.datasets.tasks", "webapp.exports.tasks")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports, anywhere in the file (functions included), as absolute names."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    graph = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "migrations" not in path.parts:
                name = module_name(path, root)
                graph[name] = imports_of(path, name)
    return graph


def _within(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Every module `start` reaches (ours and others'), each with the module of ours that imports it."""
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        current = todo.pop()
        for target in graph.get(current, ()):
            if target not in seen:
                seen[target] = current
                if target in graph:
                    todo.append(target)
    return seen


def forbidden_arrows(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for name, targets in graph.items():
        layer = name.split(".")[0]
        if layer == "webapp" and not _within(name, GLUE):
            for target, via in reachable(graph, name).items():
                if _within(target, TRAINING_LIBRARIES) or _within(target, GLUE + ("bench", "tests")):
                    problems.append(f"{name} reaches {target} (imported by {via})")
        elif layer == "worker":
            problems += [f"{name} imports {t}" for t in targets if _within(t, ("django", "webapp", "bench", "tests"))]
        elif layer == "bench":
            problems += [f"{name} imports {t}" for t in targets if _within(t, ("tests",)) or _within(t, GLUE)]
        elif layer == "tests":
            problems += [f"{name} imports {t}" for t in targets if _within(t, ("bench",))]
    return sorted(set(problems))


def test_every_door_between_the_layers_opens_one_way():
    assert forbidden_arrows(import_graph(ROOT)) == []


def test_the_web_side_reaches_only_torch_free_worker_modules():
    graph = import_graph(ROOT)
    reached = {t for name in graph if _within(name, ("webapp",)) and not _within(name, GLUE)
               for t in reachable(graph, name) if _within(t, ("worker",)) and t in graph}
    # The contract (spec, registry, catalog, errors, events) and nothing that trains.
    assert not [t for t in reached if _within(t, ("worker.recipes", "worker.models", "worker.quality"))]
    assert {"worker.spec", "worker.families", "worker.catalog"} <= reached


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for relative, text in files.items():
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in PACKAGES:
        (tmp_path / package).mkdir(exist_ok=True)
    return tmp_path


@pytest.mark.parametrize(
    ("files", "arrow"),
    [
        # A lazy import inside a function counts.
        ({"webapp/views.py": "def f():\n    import torch\n"}, "webapp.views reaches torch"),
        # So does one made through a worker module that looks harmless.
        ({"webapp/views.py": "from worker import helpers\n", "worker/helpers.py": "from transformers import AutoModel\n"},
         "webapp.views reaches transformers (imported by worker.helpers)"),
        ({"webapp/views.py": "from webapp.jobs.tasks import train_job\n", "webapp/jobs/tasks.py": ""},
         "webapp.views reaches webapp.jobs.tasks"),
        ({"worker/run.py": "from django.conf import settings\n"}, "worker.run imports django.conf"),
        ({"worker/recipes/sft.py": "from ..events import x\nfrom webapp.jobs import models\n"},
         "worker.recipes.sft imports webapp.jobs"),
        ({"bench/service.py": "from tests.support.stack import Stack\n"}, "bench.service imports tests.support.stack"),
        ({"tests/test_x.py": "import bench.training\n"}, "tests.test_x imports bench.training"),
    ],
)
def test_each_forbidden_arrow_is_found(tmp_path, files, arrow):
    problems = forbidden_arrows(import_graph(_tree(tmp_path, files)))
    assert any(p.startswith(arrow) for p in problems), problems


def test_the_glue_may_import_both_sides(tmp_path):
    files = {"webapp/jobs/tasks.py": "from webapp.jobs.models import Job\ndef run():\n    from worker.run import load_recipe\n",
             "webapp/jobs/models.py": "", "worker/run.py": "import torch\n"}
    assert forbidden_arrows(import_graph(_tree(tmp_path, files))) == []
