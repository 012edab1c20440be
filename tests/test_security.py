"""Security: YAML is read with safe loading only, every ``torch.load`` passes ``weights_only=True``, and a
config never names code to import unless the caller opts in from Python.

A source scan (``ast``, so comments and docstrings do not count) over the package, the tests, the
benchmarks, the examples and the docs' scripts, a behavioural check that a config YAML with a
Python object tag is refused, and checks that no config option imports a module of the config's
choosing without ``allow_imports=True``. (Fallback file names made from ``../`` and absolute tags are tested in
``tests/test_foundation.py``.)
"""

from __future__ import annotations

import ast
import dataclasses
import os
import sys
from typing import Any

import pytest
import torch
import yaml

from lightning_introspect.config import (
    CALLBACKS,
    IMPORT_OPTIONS,
    IntrospectionConfig,
    introspection_callbacks,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("lightning_introspect", "tests", "benchmarks", "examples", "docs")
_SAFE_LOADERS = {"SafeLoader", "CSafeLoader", "BaseLoader", "CBaseLoader"}
_UNSAFE_YAML = {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _dotted(node: ast.AST) -> str:
    """``yaml.load`` / ``torch.load`` / ``load`` for a call's function (empty if not a plain name chain)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_loads(source: str, filename: str = "<string>") -> list[str]:
    """``file:line: problem`` for every unsafe YAML load and every ``torch.load`` without ``weights_only=True``."""
    tree = ast.parse(source, filename)
    problems = []
    yaml_names = {"yaml"}  # `import yaml as y` -> "y"
    torch_names = {"torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "yaml":
                    yaml_names.add(alias.asname or "yaml")
                if alias.name == "torch":
                    torch_names.add(alias.asname or "torch")
        elif isinstance(node, ast.ImportFrom) and node.module in ("yaml", "torch"):
            for alias in node.names:
                if alias.name in {"load", "load_all", *_UNSAFE_YAML}:
                    problems.append(f"{filename}:{node.lineno}: `from {node.module} import {alias.name}` hides the loader")
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, attr = name.rpartition(".")
        if head in yaml_names and attr in _UNSAFE_YAML:
            problems.append(f"{filename}:{node.lineno}: {name}() can build arbitrary Python objects")
        elif head in yaml_names and attr in ("load", "load_all"):
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if loader is None or _dotted(loader).rpartition(".")[2] not in _SAFE_LOADERS:
                problems.append(f"{filename}:{node.lineno}: {name}() without a safe Loader (use yaml.safe_load)")
        elif head in torch_names and attr == "load":
            flag = _keyword(node, "weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                problems.append(f"{filename}:{node.lineno}: {name}() without weights_only=True")
    return problems


def _python_files() -> list[str]:
    files = []
    for top in SCANNED:
        for folder, dirs, names in os.walk(os.path.join(ROOT, top)):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            files += [os.path.join(folder, n) for n in names if n.endswith(".py")]
    return files


def test_the_scanner_catches_each_unsafe_pattern() -> None:
    bad = {
        "import yaml\nyaml.load(open('c.yaml'))": "without a safe Loader",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)": "without a safe Loader",
        "import yaml\nyaml.load(s, yaml.FullLoader)": "without a safe Loader",
        "import yaml as y\ny.unsafe_load(s)": "arbitrary Python objects",
        "import yaml\nyaml.full_load(s)": "arbitrary Python objects",
        "from yaml import load": "hides the loader",
        "import torch\ntorch.load('x.pt')": "without weights_only=True",
        "import torch\ntorch.load('x.pt', weights_only=False)": "without weights_only=True",
        "import torch as t\nt.load('x.pt', map_location='cpu')": "without weights_only=True",
        "from torch import load": "hides the loader",
    }
    for source, problem in bad.items():
        found = unsafe_loads(source)
        assert len(found) == 1 and problem in found[0], (source, found)
    good = (
        "import yaml\nyaml.safe_load(s)\nyaml.load(s, Loader=yaml.SafeLoader)\nyaml.safe_load_all(s)\n"
        "import torch\ntorch.load('x.pt', weights_only=True)\ntorch.load(f, map_location='cpu', weights_only=True)\n"
        "# torch.load('x.pt') in a comment\n'''yaml.load(s) in a docstring'''\n"
    )
    assert unsafe_loads(good) == []


def test_no_unsafe_yaml_and_every_torch_load_is_weights_only() -> None:
    files = _python_files()
    assert any(f.endswith(os.path.join("lightning_introspect", "config.py")) for f in files)
    problems = []
    for path in files:
        with open(path, encoding="utf-8") as fh:
            problems += unsafe_loads(fh.read(), os.path.relpath(path, ROOT))
    assert not problems, "\n".join(problems)


def test_config_yaml_with_a_python_object_tag_is_refused(tmp_path: Any) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "introspection.yaml"
    path.write_text(f'per_class_metrics: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(yaml.constructor.ConstructorError, match="could not determine a constructor"):
        IntrospectionConfig.from_yaml(path)
    assert not marker.exists()


# ------------------------------------------------------------------ code named by a config is never imported
_SPY = "introspect_spy_decoder"


@pytest.fixture
def spy_module(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An importable module that leaves a marker file when imported (``<tmp>/imported``) and holds a decoder."""
    folder = tmp_path / "spy"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / f"{_SPY}.py").write_text(
        "import pathlib\n"
        "import torch\n"
        f"pathlib.Path({str(marker)!r}).write_text('imported')\n"
        "class Decoder(torch.nn.Sequential):\n"
        "    def __init__(self):\n"
        "        super().__init__(torch.nn.Linear(8, 3 * 8 * 8), torch.nn.Unflatten(1, (3, 8, 8)), torch.nn.Sigmoid())\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, _SPY, raising=False)
    yield marker
    sys.modules.pop(_SPY, None)


def _only(section: str, options: dict[str, Any]) -> dict[str, Any]:
    return {s: (options if s == section else False) for s in CALLBACKS}


def test_an_import_path_in_a_yaml_config_is_refused_and_nothing_is_imported(tmp_path: Any, spy_module: Any) -> None:
    path = tmp_path / "introspection.yaml"
    path.write_text(yaml.safe_dump(_only("feature_visualization", {"prior": f"{_SPY}:Decoder"})))
    with pytest.raises(ValueError, match=r"`feature_visualization\.prior`.*allow_imports=True") as err:
        introspection_callbacks(str(path))
    assert f"{_SPY}:Decoder" in str(err.value)
    assert not spy_module.exists() and _SPY not in sys.modules
    # a dict (perhaps read from JSON by the caller) is a config too
    with pytest.raises(ValueError, match="allow_imports=True"):
        introspection_callbacks(_only("feature_visualization", {"prior": f"{_SPY}.Decoder"}))
    with pytest.raises(ValueError, match="allow_imports=True"):
        introspection_callbacks(IntrospectionConfig.from_yaml(path))
    assert not spy_module.exists() and _SPY not in sys.modules


def test_the_explicit_python_opt_in_imports_the_prior(tmp_path: Any, spy_module: Any) -> None:
    path = tmp_path / "introspection.yaml"
    path.write_text(yaml.safe_dump(_only("feature_visualization", {"prior": f"{_SPY}:Decoder"})))
    (callback,) = introspection_callbacks(str(path), allow_imports=True)
    assert spy_module.exists() and type(callback.prior_module).__name__ == "Decoder"
    with pytest.raises(ValueError, match="allow_imports"):
        introspection_callbacks(str(path), allow_imports="yes")  # type: ignore[arg-type]


def test_a_prior_object_passed_from_python_needs_no_opt_in() -> None:
    decoder = torch.nn.Sequential(torch.nn.Linear(4, 3 * 8 * 8), torch.nn.Unflatten(1, (3, 8, 8)))
    (callback,) = introspection_callbacks(_only("feature_visualization", {"prior": decoder}))
    assert callback.prior_module is decoder  # the object itself, not a copy


def test_no_config_option_imports_code_without_the_opt_in(spy_module: Any) -> None:
    """Every option of every section set to an import path: none imports it (a new option that resolves
    strings to code must be listed in ``IMPORT_OPTIONS``)."""
    for section in CALLBACKS:
        options = {f.name for f in dataclasses.fields(IntrospectionConfig.from_dict({}).sections[section])}
        for option in sorted(options - {"enabled"}):
            try:
                introspection_callbacks(_only(section, {option: f"{_SPY}:Decoder"}))
            except (ValueError, TypeError):
                pass  # refused (as an import path, or as a bad value): fine, as long as nothing was imported
            assert not spy_module.exists() and _SPY not in sys.modules, f"{section}.{option} imported the spy"
    assert IMPORT_OPTIONS == {"feature_visualization": ("prior",)}
