"""Every code block of README.md and docs/**/*.md runs, or is checked, as written.

* ```python blocks are executed, each page's blocks in order in one namespace (a page's
  examples may build on each other).
* ```bash / ```sh / ```console blocks are checked line by line, without running them: a
  ``make X`` line must name a target of the Makefile; a ``subspace-jax ...`` line must
  parse (``subspace_lab.cli.validate``, which runs nothing); any other line's relative
  paths (``scripts/...``, ``tests/...``) must exist.
* ```text blocks are output and are not run. A block whose preceding line is
  ``<!-- not run -->`` is skipped; every other block must say its language.
* Relative links of every page must point at files (and headings) that exist.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
SKIP = "<!-- not run -->"
SHELL = {"bash", "sh", "console"}
KNOWN = SHELL | {"python", "text"}
_FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
_LINK = re.compile(r"\]\(([^)\s]+)\)")
# A relative path inside the repository, as shell lines name them (scripts/x.sh, tests/).
_PATH = re.compile(r"^(?:\./)?[\w.-]+(?:/[\w.-]+)*(?:/|\.(?:py|sh|md|json|ipynb|toml|npz))$")


@dataclasses.dataclass(frozen=True)
class Block:
    page: pathlib.Path
    lang: str
    code: str
    line: int  # 1-based line of the opening fence
    skipped: bool

    def where(self) -> str:
        first = next((s for s in self.code.splitlines() if s.strip()), "")
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang} block {first!r})"


def blocks(page: pathlib.Path) -> list[Block]:
    text = page.read_text()
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = [s.strip() for s in text[:m.start()].splitlines() if s.strip()]
        out.append(Block(page, m.group(1), m.group(2), line,
                         bool(before) and before[-1] == SKIP))
    return out


def _id(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def _make_targets() -> set[str]:
    targets = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.%-]+(?:\s+[A-Za-z0-9_.%-]+)*)\s*:(?!=)", line)
        if m and not line.startswith(("\t", ".")):
            targets.update(m.group(1).split())
        if line.startswith(".PHONY:"):
            targets.update(line.split(":", 1)[1].split())
    return targets


def _commands(code: str, lang: str) -> list[str]:
    """The block's command lines: prompts, comments and continuations handled."""
    lines, pending = [], ""
    for raw in code.splitlines():
        line = raw.strip()
        if lang == "console":
            if not line.startswith("$ ") and not pending:
                continue  # output of the previous command
            line = line.removeprefix("$ ")
        line = pending + line
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            lines.append(line)
    return lines


def _words(line: str) -> list[str]:
    """The command's words, without leading ``VAR=value`` assignments and with a
    ``.venv/bin/`` prefix dropped from the program."""
    words = shlex.split(line)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)
    if words:
        words[0] = words[0].removeprefix("./").removeprefix(".venv/bin/")
    return words


def _check_command(line: str, targets: set[str]) -> str | None:
    """None if the line is fine, else why not."""
    words = _words(line)
    if not words:
        return None
    if words[0] == "make":
        missing = [w for w in words[1:] if not w.startswith("-") and "=" not in w
                   and w not in targets]
        return f"make target(s) {missing} not in the Makefile" if missing else None
    if words[0] == "subspace-jax":
        from subspace_lab import cli

        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                cli.validate(words[1:])
        except SystemExit as e:
            if e.code not in (0, None):
                why = (err.getvalue().strip().splitlines() or [f"exit {e.code}"])[-1]
                return f"`{line}` does not parse: {why}"
        return None
    for word in words[1:]:
        if _PATH.match(word) and not (ROOT / word).exists():
            return f"`{line}` names {word}, which does not exist"
    return None


def test_readme_shows_the_two_commands_first():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")


def test_every_block_says_its_language():
    bad = [b.where() for p in PAGES for b in blocks(p) if not b.skipped and b.lang not in KNOWN]
    assert not bad, f"blocks without a known language ({sorted(KNOWN)}): {bad}"


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_python_blocks_run(page, capsys):
    namespace = {"__name__": f"docs:{_id(page)}"}
    ran = 0
    for block in blocks(page):
        if block.lang != "python" or block.skipped:
            continue
        try:
            exec(compile(block.code, f"{page}:{block.line}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{block.where()} failed: {type(e).__name__}: {e}") from e
        ran += 1
    out = capsys.readouterr().out
    if page == README:
        assert ran, "README has no python example"
        assert "NestedRule(max_rank=None, split=0.5)" in out, out  # the select table
        assert "matched no path" in out, out  # the error that names the rule


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_shell_blocks_are_real_commands(page):
    targets = _make_targets()
    problems = []
    for block in blocks(page):
        if block.lang not in SHELL or block.skipped:
            continue
        for line in _commands(block.code, block.lang):
            why = _check_command(line, targets)
            if why:
                problems.append(f"{block.where()}: {why}")
    assert not problems, "\n".join(problems)


def _anchors(page: pathlib.Path) -> set[str]:
    """GitHub's anchors of a page's headings."""
    heads = re.findall(r"^#+ (.*)$", _FENCE.sub("", page.read_text()), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


@pytest.mark.parametrize("page", PAGES, ids=_id)
def test_relative_links_exist(page):
    prose = re.sub(r"`[^`\n]*`", "", _FENCE.sub("", page.read_text()))
    missing = []
    for target in _LINK.findall(prose):
        if re.match(r"^[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        file = page.parent / path if path else page
        if not file.exists():
            missing.append(target)
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            missing.append(f"{target} (no such heading)")
    assert not missing, f"{_id(page)} links to missing files or headings: {missing}"
