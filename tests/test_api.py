"""The public surface: explicit exports, documented with runnable examples that pass."""

import dataclasses
import doctest
import importlib
import inspect
import pkgutil

import pytest

import subspace_jax
import subspace_lab

MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(subspace_jax.__path__, prefix="subspace_jax.")
    if not m.name.rsplit(".", 1)[-1].startswith("_")
)
# The lab's modules (experiments included): their examples run too.
LAB_MODULES = sorted(
    m.name
    for m in pkgutil.walk_packages(subspace_lab.__path__, prefix="subspace_lab.")
    if not m.name.rsplit(".", 1)[-1].startswith("_")
)


def _public(module):
    names = getattr(module, "__all__", ())
    return [(name, getattr(module, name)) for name in names]


def _fields(obj):
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj)]
    return list(getattr(obj, "_fields", ()))  # NamedTuple


def _undocumented(obj):
    """Why ``obj``'s docstring falls short, or None: callables need a runnable example;
    result containers (dataclasses, NamedTuples) may instead describe every field."""
    doc = inspect.getdoc(obj) or ""
    if "Examples:" in doc:
        return None
    fields = _fields(obj) if inspect.isclass(obj) else []
    if fields:
        missing = [f for f in fields if f not in doc]
        return f"fields {missing} not described" if missing else None
    return "no Examples section"


def test_all_names_resolve_and_are_documented():
    problems = []
    for module_name in ["subspace_jax"] + MODULES:
        module = importlib.import_module(module_name)
        for name, obj in _public(module):
            if inspect.ismodule(obj) or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            why = _undocumented(obj)
            if why:
                problems.append(f"{module_name}.{name}: {why}")
    assert not problems, "\n".join(problems)


def test_top_level_exports_are_explicit():
    assert len(set(subspace_jax.__all__)) == len(subspace_jax.__all__)
    for name in subspace_jax.__all__:
        assert hasattr(subspace_jax, name), name


@pytest.mark.parametrize("module_name", ["subspace_jax"] + MODULES + LAB_MODULES)
def test_doctests_pass(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(
        module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {module_name}"
