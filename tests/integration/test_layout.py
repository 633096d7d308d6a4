"""The layout's rules, read off the source: which package may import which.

* ``detr`` (the model) imports neither Ray, the jobs, storage nor COCO code;
* ``coco`` imports neither torch, Ray, the model nor the jobs; ``storage`` none of those nor ``coco``;
* only the annotate pipeline and the finetune driver and worker import Ray;
* a job imports no other job (shared parts live in ``coco``, ``storage``, ``detr`` and ``jobs.cli``).

Imports inside functions count too. A second check imports the packages in a fresh interpreter,
so that what they pull in transitively is seen as well.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGES = ("detr", "coco", "storage", "jobs")
FORBIDDEN = {
    "detr": ("ray", "jobs", "storage", "coco"),
    "coco": ("torch", "torchvision", "ray", "detr", "jobs"),
    "storage": ("torch", "torchvision", "ray", "detr", "coco", "jobs"),
}
# The drivers, the train worker, the decode task (it asks Ray which attempt it is) and the
# start-up clock (the cluster's key-value store).
RAY_MODULES = {
    "jobs.annotate.decoding",
    "jobs.annotate.pipeline",
    "jobs.annotate.ray_start",
    "jobs.annotate.startup_clock",
    "jobs.finetune.trainer",
    "jobs.finetune.worker",
}
JOBS = ("annotate", "finetune", "score", "coco_export", "synthetic_shapes")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in the file, as absolute dotted names."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            else:
                found.add(node.module)
    return found


def source_modules() -> dict[str, set[str]]:
    return {
        module_name(path): imports_of(path) for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
    }


def top(name: str) -> str:
    return name.split(".")[0]


def test_the_import_reader_sees_what_a_module_imports(tmp_path):
    found = imports_of(ROOT / "jobs" / "annotate" / "pipeline.py")
    assert {"detr.checkpoint", "jobs.annotate.listing", "storage"} <= found
    assert "ray" in found, "the function-level `import ray` counts"


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_lower_layers_import_nothing_above_them(package):
    offenders = {
        module: sorted(i for i in imported if top(i) in FORBIDDEN[package])
        for module, imported in source_modules().items()
        if top(module) == package
    }
    assert not {m: i for m, i in offenders.items() if i}, f"{package} must not import {FORBIDDEN[package]}"


def test_only_the_drivers_and_the_tasks_that_ask_ray_import_it():
    users = {module for module, imported in source_modules().items() if any(top(i) == "ray" for i in imported)}
    assert users == RAY_MODULES


@pytest.mark.parametrize("job", JOBS)
def test_jobs_do_not_import_each_other(job):
    others = tuple(f"jobs.{other}" for other in JOBS if other != job)
    offenders = {
        module: sorted(i for i in imported if i.startswith(others))
        for module, imported in source_modules().items()
        if module == f"jobs.{job}" or module.startswith(f"jobs.{job}.")
    }
    assert not {m: i for m, i in offenders.items() if i}


@pytest.mark.parametrize(
    ("statement", "absent"),
    [
        ("import coco", ("torch", "ray", "detr", "jobs")),
        ("import storage", ("torch", "ray", "detr", "coco", "jobs")),
        ("import detr; detr.DETR", ("ray", "jobs", "storage", "coco")),
        # fetching weights and reading the registry need no torch: the annotate job does it before Ray starts
        ("import detr; detr.REGISTRY; from detr.download import local_path", ("torch", "ray", "jobs")),
        ("import jobs.score", ("torch", "ray", "detr")),  # scoring stays a NumPy job
        # the command-line layer every job shares loads none of the jobs' libraries
        ("import jobs.cli", ("torch", "ray", "detr", "coco")),
        ("import jobs.annotate.listing", ("torch", "detr")),  # listing workers stay small
        # the command line is parsed and checked before torch and Ray load, side by side (ray_start)
        ("from jobs.annotate.settings import build_parser; build_parser()", ("torch", "ray")),
        # decode workers load torch to resize (lazily), never the model's code or torchvision
        ("from jobs.annotate.decoding import decode_block", ("torch", "torchvision", "ray")),
    ],
)
def test_what_an_import_pulls_in(statement, absent):
    code = f"import sys; {statement}; print(sorted({{m.split('.')[0] for m in sys.modules}}))"
    loaded = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert not set(absent) & set(eval(loaded.stdout)), loaded.stdout  # noqa: S307 - our own printed list
