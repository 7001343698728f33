"""The import directions written in diffalign/__init__.py hold: every import of every module (lazy ones inside
functions included) goes to its own layer or a lower one."""

from __future__ import annotations

import ast
from pathlib import Path

import diffalign

PACKAGE = Path(diffalign.__file__).parent
THIRD_PARTY_BANNED = {
    "rewards": {"diffusers"},  # rewards know nothing about diffusion
    "losses": {"diffusers", "transformers", "peft", "accelerate", "numpy"},  # pure tensor math: torch only
    "gym": {"diffusers", "transformers", "peft", "accelerate"},  # the toy world is a leaf
}


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def layer_of(module: str) -> str:
    """The LAYERS key of a module path relative to the package ('models/sd.py' -> 'models')."""
    return module.split("/")[0].removesuffix(".py")


def test_every_module_belongs_to_a_layer():
    tops = {p.name.removesuffix(".py") for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").exists()}
    assert tops - {"__init__"} == set(diffalign.LAYERS), "add new modules to diffalign.LAYERS"


def test_no_module_imports_upward_or_across_banned_lines():
    violations = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative == "__init__.py":
            continue
        own = layer_of(relative)
        for line, module in imports_of(path):
            parts = module.split(".")
            if parts[0] == "diffalign" and len(parts) > 1:
                target = parts[1]
                if diffalign.LAYERS[target] > diffalign.LAYERS[own]:
                    violations.append(f"{relative}:{line} ({own}, layer {diffalign.LAYERS[own]}) imports {module}")
                if own == "rewards" and target == "models":
                    violations.append(f"{relative}:{line} rewards import models ({module})")
                if own == "losses" and target != "losses":
                    violations.append(f"{relative}:{line} losses import {module} (torch only)")
            elif parts[0] in THIRD_PARTY_BANNED.get(own, set()):
                violations.append(f"{relative}:{line} ({own}) imports {module}")
    assert not violations, "imports against the layers of diffalign/__init__.py:\n" + "\n".join(violations)


def test_the_check_catches_an_upward_import(tmp_path):
    """The checker itself: an import of apps from models is found, a lazy one too."""
    module = tmp_path / "fake.py"
    module.write_text("import torch\n\ndef f():\n    from diffalign.apps.demo import run_demo\n")
    found = imports_of(module)
    assert (4, "diffalign.apps.demo") in found and (1, "torch") in found


def test_test_modules_share_helpers_through_helper_modules_never_through_each_other():
    """A test module that imports another runs (and collects) the other's tests' setup as a side effect, and ties two
    files' fixtures together: shared helpers live in tests/<helper>.py (clitools, sampling, rewardfiles, ...)."""
    tests = Path(__file__).parent
    crossing = [
        f"{path.name}:{line}: {module}"
        for path in sorted(tests.glob("test_*.py"))
        for line, module in imports_of(path)
        if module.startswith("test_")
    ]
    assert not crossing, "\n".join(crossing)
