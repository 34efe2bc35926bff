"""The Python standard library's own source files as an offline corpus.

Shared by :mod:`subspace_jax.data.pydoc_topics` and :mod:`subspace_jax.data.lm_corpus`:
listing the source files in a fixed order, naming their modules, extracting their
docstrings by parsing with :mod:`ast` (the files are never imported), and a small on-disk
cache keyed by the Python version and a hash of the content.

The cache directory is ``$SUBSPACE_JAX_CACHE`` if set, else
``$XDG_CACHE_HOME/subspace_jax``, else ``~/.cache/subspace_jax``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gc
import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
from collections.abc import Iterable, Sequence
from pathlib import Path

__all__ = [
    "SourceFile",
    "Docstring",
    "stdlib_dir",
    "list_source_files",
    "read_source",
    "extract_docstrings",
    "cache_dir",
    "python_tag",
    "digest",
    "atomic_write",
]

# Bump when the extraction logic changes, so stale caches are not reused.
_EXTRACTOR_VERSION = "1"
_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
# Generated or machine-specific files, and files that are not prose or code.
_SKIP_MODULES = frozenset({"this", "antigravity"})
_SKIP_PREFIXES = ("_sysconfigdata",)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceFile:
    """One ``.py`` file of the standard library.

    Attributes:
        module: Dotted module name, e.g. ``"email.mime.text"`` (``__init__`` dropped).
        relpath: Path relative to :func:`stdlib_dir`, with ``/`` separators.
        nbytes: Size of the file in bytes.
    """

    module: str
    relpath: str
    nbytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Docstring:
    """One docstring, as :func:`inspect.cleandoc` leaves it.

    Attributes:
        module: Dotted name of the module it was found in.
        qualname: Dotted path of the owner inside the module (``""`` for the module).
        kind: ``"module"``, ``"class"`` or ``"function"``.
        text: The docstring text.
    """

    module: str
    qualname: str
    kind: str
    text: str


@functools.cache
def stdlib_dir() -> Path:
    """The directory of the running interpreter's pure-Python standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def python_tag() -> str:
    """``"py311"`` style tag of the running interpreter, part of every cache key."""
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def digest(*parts: bytes | str) -> str:
    """A short, stable hex digest (SHA-256, 16 hex digits) of ``parts``.

    Examples:
        >>> digest("a", b"b") == digest("a", "b")
        True
        >>> len(digest("x"))
        16
    """
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    """The on-disk cache directory (created on first use)."""
    env = os.environ.get("SUBSPACE_JAX_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "subspace_jax"
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _module_name(parts: Sequence[str]) -> str:
    names = list(parts[:-1]) + [parts[-1][: -len(".py")]]
    if names[-1] == "__init__":
        names.pop()
    return ".".join(names)


def _keep(parts: Sequence[str], include_tests: bool) -> bool:
    names = list(parts[:-1]) + [parts[-1][: -len(".py")]]
    if not all(name.isidentifier() for name in names):  # site-packages, config-3.x, ...
        return False
    if not include_tests and _TEST_DIRS.intersection(parts[:-1]):
        return False
    return names[0] not in _SKIP_MODULES and not names[0].startswith(_SKIP_PREFIXES)


def list_source_files(*, include_tests: bool = False) -> tuple[SourceFile, ...]:
    """All ``.py`` files of the standard library, sorted by relative path.

    Third-party packages (``site-packages``), build configuration and generated files
    are left out, and so are test suites unless ``include_tests``.

    Args:
        include_tests: Keep files under ``test``, ``tests`` and ``idle_test`` directories.

    Returns:
        The files, in a fixed order that depends only on their paths.

    Examples:
        >>> files = list_source_files()
        >>> any(f.module == "email.mime.text" for f in files)
        True
    """
    root = stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).parts
        # Prune in place: only package-like directories (not site-packages, config-3.x).
        dirnames[:] = [d for d in dirnames if d.isidentifier() and d != "__pycache__"
                       and (include_tests or d not in _TEST_DIRS)]
        for name in filenames:
            parts = (*rel_dir, name)
            if name.endswith(".py") and _keep(parts, include_tests):
                size = os.stat(os.path.join(dirpath, name)).st_size
                out.append(SourceFile(module=_module_name(parts), relpath="/".join(parts),
                                      nbytes=size))
    return tuple(sorted(out, key=lambda f: f.relpath))


def read_source(file: SourceFile) -> str:
    """The text of ``file``, decoded with its PEP 263 encoding; ``\\r\\n`` becomes ``\\n``."""
    data = (stdlib_dir() / file.relpath).read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    text = data.decode(encoding, errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _docstrings_of(tree: ast.Module, module: str) -> list[Docstring]:
    found = []
    text = ast.get_docstring(tree, clean=True)
    if text:
        found.append(Docstring(module=module, qualname="", kind="module", text=text))
    _walk(tree.body, module, "", found)
    return found


def _walk(body: Iterable[ast.stmt], module: str, prefix: str, found: list[Docstring]) -> None:
    """Collect class and function docstrings, looking inside compound statements."""
    for node in body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            qualname = f"{prefix}{node.name}"
            text = ast.get_docstring(node, clean=True)
            if text:
                kind = "class" if isinstance(node, ast.ClassDef) else "function"
                found.append(Docstring(module=module, qualname=qualname, kind=kind, text=text))
            _walk(node.body, module, qualname + ".", found)
            continue
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list):
                _walk(block, module, prefix, found)
        for handler in getattr(node, "handlers", None) or ():
            _walk(handler.body, module, prefix, found)
        for case in getattr(node, "cases", None) or ():
            _walk(case.body, module, prefix, found)


def _parse_all(files: Sequence[SourceFile], sources: Sequence[str]) -> list[Docstring]:
    found: list[Docstring] = []
    enabled = gc.isenabled()
    gc.disable()  # the parser allocates many small objects; collection only slows it
    try:
        for file, source in zip(files, sources):
            try:
                tree = ast.parse(source, filename=file.relpath)
            except SyntaxError:  # e.g. a file written for another Python version
                continue
            found.extend(_docstrings_of(tree, file.module))
            del tree
    finally:
        if enabled:
            gc.enable()
    return found


def extract_docstrings(files: Sequence[SourceFile] | None = None) -> tuple[Docstring, ...]:
    """The docstrings of every module, class and function of ``files``.

    Files are parsed with :func:`ast.parse`, never imported. A file that does not parse
    is skipped. The result is cached on disk under :func:`cache_dir`, keyed by the Python
    version and a hash of the files' paths and contents; a cold call over the whole
    standard library takes a few seconds, a warm one a few tens of milliseconds.

    Args:
        files: Files to read; all of :func:`list_source_files` by default.

    Returns:
        Docstrings in file order, then source order.

    Examples:
        >>> docs = extract_docstrings()
        >>> [d.kind for d in docs if d.module == "textwrap" and d.qualname == "dedent"]
        ['function']
    """
    files = list_source_files() if files is None else tuple(files)
    sources = [read_source(f) for f in files]
    key = digest(_EXTRACTOR_VERSION, python_tag(), *[f.relpath for f in files], *sources)
    path = cache_dir() / "docstrings" / f"{python_tag()}-{key}.json"
    if path.exists():
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
            return tuple(Docstring(module=m, qualname=q, kind=k, text=t) for m, q, k, t in rows)
        except (ValueError, TypeError):  # a corrupt cache file: rebuild it
            pass
    found = _parse_all(files, sources)
    rows = [[d.module, d.qualname, d.kind, d.text] for d in found]
    atomic_write(path, json.dumps(rows, ensure_ascii=False).encode("utf-8"))
    return tuple(found)
