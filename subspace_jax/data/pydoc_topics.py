"""Text classification: standard-library docstrings labelled by the topic of their module.

Every docstring (module, class, function, method) of the modules listed in
:data:`TOPICS` is read by parsing the Python standard library's source with
:mod:`ast` (nothing is imported), cleaned, and labelled with its module's topic:

* cleaning: doctest blocks (a ``>>>`` line and what follows it up to a blank line) are
  dropped, whitespace is collapsed, generated boilerplate is dropped, texts shorter than
  ``min_chars`` are dropped and longer ones cut at a word boundary to ``max_chars``;
* exact de-duplication on the case-folded text: the first copy (in file order) is kept,
  and a text that occurs under two different topics is dropped altogether;
* the split is **by module**: every docstring of a module lands in one split, so a model
  must generalise to modules it never saw. Within each topic, modules are assigned with
  :func:`subspace_jax.data.batching.group_split`, so each topic is split about
  ``1 - val - test : val : test`` by examples, and modules too large for val/test stay
  in train.

With Python 3.11 this gives about 5,500 examples over 11 topics. The data depend
only on the Python version's standard library, ``seed`` and the arguments.
"""

from __future__ import annotations

import dataclasses
import sys
import numpy as np

from subspace_jax.data import _stdlib, batching

__all__ = ["TOPICS", "TextSplit", "TextSplits", "load_pydoc_topics", "topic_of", "clean_docstring"]

# Topic -> module names; a name covers the module and all its submodules. Modules removed
# in later Pythons (asyncore, smtpd, imp, ...) are simply absent there. Left out on
# purpose: distutils and lib2to3 (gone in 3.12/3.13), idlelib (an application), modules
# without a clear single topic (argparse, ctypes, pydoc, hashlib, ...), and dates and
# times (datetime, calendar, zoneinfo, _strptime: about 100 docstrings in four modules,
# too few modules for a split by module).
TOPICS: dict[str, tuple[str, ...]] = {
    "concurrency": (
        "asyncio", "concurrent", "multiprocessing", "threading", "_threading_local", "queue",
        "sched", "subprocess", "signal", "contextvars",
    ),
    "data_formats": (
        "base64", "configparser", "copyreg", "csv", "dbm", "html", "_markupbase", "json",
        "netrc", "pickle", "_compat_pickle", "pickletools", "plistlib", "quopri", "shelve",
        "sqlite3", "tomllib", "uu", "xdrlib", "xml", "uuid",
    ),
    "email": ("email", "mailbox", "mailcap", "mimetypes"),
    "files_and_os": (
        "os", "posixpath", "ntpath", "genericpath", "pathlib", "shutil", "glob", "fnmatch",
        "tempfile", "stat", "filecmp", "fileinput", "io", "_pyio", "linecache", "zipfile",
        "tarfile", "gzip", "bz2", "lzma", "_compression", "getpass", "platform", "pty", "tty",
        "pipes", "_osx_support", "_aix_support",
    ),
    "gui": ("tkinter", "turtle", "turtledemo", "curses"),
    "import_system": (
        "importlib", "pkgutil", "modulefinder", "zipimport", "runpy", "imp", "site",
        "_sitebuiltins", "sysconfig", "venv", "compileall", "py_compile", "zipapp", "ensurepip",
    ),
    "language_and_types": (
        "abc", "_py_abc", "ast", "collections", "_collections_abc", "contextlib", "copy",
        "dataclasses", "dis", "enum", "functools", "graphlib", "inspect", "keyword", "opcode",
        "operator", "pyclbr", "reprlib", "symtable", "token", "tokenize", "types", "typing",
        "weakref", "_weakrefset", "__future__", "heapq", "bisect",
    ),
    "networking": (
        "asynchat", "asyncore", "cgi", "cgitb", "ftplib", "http", "imaplib", "ipaddress",
        "nntplib", "poplib", "selectors", "smtpd", "smtplib", "socket", "socketserver", "ssl",
        "telnetlib", "urllib", "nturl2path", "webbrowser", "wsgiref", "xmlrpc",
    ),
    "numbers_and_math": (
        "decimal", "_pydecimal", "fractions", "numbers", "random", "statistics", "colorsys",
        "secrets", "_pylong",
    ),
    "testing_debugging": (
        "unittest", "doctest", "pdb", "bdb", "trace", "traceback", "cProfile", "profile",
        "pstats", "timeit", "tracemalloc", "faulthandler", "logging", "warnings", "code",
        "codeop", "tabnanny",
    ),
    "text_processing": (
        "string", "re", "sre_compile", "sre_parse", "sre_constants", "textwrap", "difflib",
        "codecs", "encodings", "stringprep", "unicodedata", "locale", "gettext", "shlex",
        "pprint",
    ),
}
# Machine-generated docstrings that would make a topic trivially easy.
_BOILERPLATE_PREFIXES = ("Python Character Mapping Codec",)
_SPLITS = ("train", "val", "test")


def _module_topics() -> dict[str, str]:
    owner: dict[str, str] = {}
    for topic, modules in TOPICS.items():
        for module in modules:
            if module in owner:
                raise ValueError(f"module {module!r} is listed under {owner[module]!r} and "
                                 f"{topic!r}")
            owner[module] = topic
    return owner


_MODULE_TOPICS = _module_topics()


def topic_of(module: str) -> str | None:
    """The topic of a dotted module name, or ``None`` if it has none.

    Examples:
        >>> topic_of("email.mime.text"), topic_of("os"), topic_of("argparse")
        ('email', 'files_and_os', None)
    """
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        topic = _MODULE_TOPICS.get(".".join(parts[:i]))
        if topic is not None:
            return topic
    return None


def clean_docstring(text: str) -> str:
    """Drop doctest blocks and collapse whitespace.

    A doctest block starts at a line beginning with ``>>>`` and runs to the next blank line.

    Examples:
        >>> clean_docstring("Add two numbers.\\n\\n    >>> add(1, 2)\\n    3\\n\\nDone.")
        'Add two numbers. Done.'
    """
    kept, in_doctest = [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(">>>"):
            in_doctest = True
        elif in_doctest and not stripped:
            in_doctest = False
        elif not in_doctest:
            kept.append(stripped)
    return " ".join(" ".join(kept).split())


def _truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip()


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TextSplit:
    """One split of a text classification set.

    Attributes:
        texts: The documents.
        labels: int32 ``(N,)`` class ids, indices into the parent's ``label_names``.
        modules: The module each document comes from (same length as ``texts``).
    """

    texts: tuple[str, ...]
    labels: np.ndarray
    modules: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def module_names(self) -> tuple[str, ...]:
        """The distinct modules of this split, sorted."""
        return tuple(sorted(set(self.modules)))


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class TextSplits:
    """Train/val/test splits of :func:`load_pydoc_topics`.

    Attributes:
        train: Training split.
        val: Validation split (modules disjoint from ``train`` and ``test``).
        test: Test split (modules disjoint from ``train`` and ``val``).
        label_names: Topic name of each class id.
    """

    train: TextSplit
    val: TextSplit
    test: TextSplit
    label_names: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def splits(self) -> dict[str, TextSplit]:
        """``{"train": ..., "val": ..., "test": ...}``."""
        return {"train": self.train, "val": self.val, "test": self.test}

    def stats(self) -> dict[str, dict[str, object]]:
        """Per split: ``n``, ``modules``, ``mean_chars`` and ``per_class`` counts by name."""
        out: dict[str, dict[str, object]] = {}
        for name, split in self.splits().items():
            counts = np.bincount(split.labels, minlength=self.num_classes)
            lengths = [len(t) for t in split.texts]
            out[name] = {
                "n": len(split),
                "modules": len(split.module_names),
                "mean_chars": float(np.mean(lengths)) if lengths else 0.0,
                "per_class": {k: int(c) for k, c in zip(self.label_names, counts)},
            }
        return out

    def describe(self) -> str:
        """A table of examples per class and split, module counts and mean lengths."""
        stats = self.stats()
        width = max(len(n) for n in self.label_names + ("mean chars",))
        lines = [f"{'class':<{width}} " + " ".join(f"{s:>6}" for s in _SPLITS)]
        for k in self.label_names:
            row = " ".join(f"{stats[s]['per_class'][k]:>6}" for s in _SPLITS)
            lines.append(f"{k:<{width}} {row}")
        for key, label in (("n", "total"), ("modules", "modules")):
            lines.append(f"{label:<{width}} " + " ".join(f"{stats[s][key]:>6}" for s in _SPLITS))
        means = " ".join(f"{stats[s]['mean_chars']:>6.0f}" for s in _SPLITS)
        lines.append(f"{'mean chars':<{width}} {means}")
        return "\n".join(lines)

    def __str__(self) -> str:
        head = (f"pydoc_topics: {sum(len(s) for s in self.splits().values())} docstrings, "
                f"{self.num_classes} classes, Python {sys.version_info.major}."
                f"{sys.version_info.minor}")
        return head + "\n" + self.describe()


def _examples(min_chars: int, max_chars: int) -> list[tuple[str, str, str]]:
    """``(module, topic, text)`` after cleaning and de-duplication, in file order."""
    rows = []
    for doc in _stdlib.extract_docstrings():
        topic = topic_of(doc.module)
        if topic is None:
            continue
        text = clean_docstring(doc.text)
        if len(text) < min_chars or text.startswith(_BOILERPLATE_PREFIXES):
            continue
        rows.append((doc.module, topic, _truncate(text, max_chars)))
    topics_of_text: dict[str, set[str]] = {}
    for _, topic, text in rows:
        topics_of_text.setdefault(text.casefold(), set()).add(topic)
    seen: set[str] = set()
    kept = []
    for row in rows:
        key = row[2].casefold()
        if key not in seen and len(topics_of_text[key]) == 1:
            kept.append(row)
        seen.add(key)
    return kept


def _check_args(max_chars: int, min_chars: int, val_fraction: float,
                test_fraction: float) -> None:
    if not 1 <= min_chars <= max_chars:
        raise ValueError(f"need 1 <= min_chars <= max_chars, got min_chars={min_chars}, "
                         f"max_chars={max_chars}")
    batching.check_split_fractions(val_fraction, test_fraction)


def load_pydoc_topics(*, max_chars: int = 600, min_chars: int = 40, seed: int = 0,
                      val_fraction: float = 0.15, test_fraction: float = 0.15) -> TextSplits:
    """Standard-library docstrings labelled by topic, split by module.

    The parsed docstrings are cached on disk (see :mod:`subspace_jax.data._stdlib`):
    a cold call takes a few seconds, a warm one well under a second.

    Args:
        max_chars: Longer texts are cut at a word boundary to at most this many characters.
        min_chars: Shorter texts (after cleaning) are dropped.
        seed: Seed of the module-to-split assignment.
        val_fraction: Target share of each topic's examples in the validation split.
        test_fraction: Target share of each topic's examples in the test split.

    Returns:
        The three splits and the label names (the sorted keys of :data:`TOPICS`).

    Raises:
        ValueError: If a length or a fraction is out of range.

    Examples:
        >>> data = load_pydoc_topics()
        >>> data.num_classes, data.label_names[0]
        (11, 'concurrency')
        >>> set(data.train.module_names) & set(data.test.module_names)
        set()
    """
    _check_args(max_chars, min_chars, val_fraction, test_fraction)
    label_names = tuple(sorted(TOPICS))
    rows = _examples(min_chars, max_chars)
    shares = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    split_of: dict[str, int] = {}
    for k, topic in enumerate(label_names):
        counts: dict[str, int] = {}
        for module, row_topic, _ in rows:
            if row_topic == topic:
                counts[module] = counts.get(module, 0) + 1
        split_of.update(batching.group_split(counts, shares, seed=(seed, k)))
    parts = []
    for s in range(len(_SPLITS)):
        chosen = [row for row in rows if split_of[row[0]] == s]
        parts.append(TextSplit(
            texts=tuple(r[2] for r in chosen),
            labels=np.array([label_names.index(r[1]) for r in chosen], dtype=np.int32),
            modules=tuple(r[0] for r in chosen),
        ))
    return TextSplits(train=parts[0], val=parts[1], test=parts[2], label_names=label_names)
