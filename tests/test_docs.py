"""The README and docs/ stay true: links, commands, paths and the settings table.

Everything is read relative to the repository this file lives in, so the
test checks the checkout it runs in, whatever `korero` the venv has installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "server" / "korero" / "server"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
MAKE = re.compile(r"(?:^|[\s;&|(])make[ \t]+([A-Za-z0-9][\w.-]*)", re.MULTILINE)
KORERO = re.compile(r"(?:^|[\s/(;&|])korero((?:[ \t]+\S+)+)", re.MULTILINE)
MAKE_RULE = re.compile(r"^([A-Za-z0-9_.-][^:=#\t]*?)[ \t]*::?(?!=)", re.MULTILINE)
WORD = re.compile(r"[a-z][a-z0-9-]*")
PATH = re.compile(r"[\w.-]+(?:/[\w.-]+)*/?")


def _rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _split(text: str) -> tuple[str, list[str], list[str]]:
    """(prose without code, fenced blocks, inline code spans)."""
    blocks = [m.group(2) for m in FENCE.finditer(text)]
    prose = FENCE.sub("", text)
    spans = [m.group(2).strip() for m in CODE_SPAN.finditer(prose)]
    return CODE_SPAN.sub("", prose), blocks, spans


def _code(page: Path) -> list[str]:
    """Every piece of code a page shows: fenced lines without `#` comments, inline spans."""
    _, blocks, spans = _split(page.read_text(encoding="utf-8"))
    lines = [re.sub(r"(?:^|\s)#.*$", "", line) for b in blocks for line in b.splitlines()]
    return lines + spans


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    # code spans stay: their text is part of the anchor
    prose = FENCE.sub("", page.read_text(encoding="utf-8"))
    seen: dict[str, int] = {}
    anchors: set[str] = set()
    for match in HEADING.finditer(prose):
        slug = _slug(match.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _ignored_dirs() -> list[str]:
    """Build and run output named in the docs but never committed (directories in
    .gitignore, e.g. `.run/`, which exists only after `make run`)."""
    lines = (ROOT / ".gitignore").read_text(encoding="utf-8").splitlines()
    return [line.strip().rstrip("/") + "/" for line in lines if line.strip().endswith("/")]


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_relative_links_point_at_files_and_headings(page: Path) -> None:
    prose, _, _ = _split(page.read_text(encoding="utf-8"))
    broken = []
    for target in LINK.findall(prose):
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", target):
            continue  # http:, https:, mailto: — not ours to check offline
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading with that anchor in {_rel(file)}")
    assert not broken, f"{_rel(page)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_rel)
def test_paths_in_code_exist(page: Path) -> None:
    """`server/...`, `tests/...` and modules such as `context/cache.py` name real files."""
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != ".git"}
    modules = {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    ignored = _ignored_dirs()
    missing = []
    for span in _split(page.read_text(encoding="utf-8"))[2]:
        if "/" not in span or not PATH.fullmatch(span) or "://" in span:
            continue
        first = span.split("/", 1)[0]
        if first in top:
            if any(f"{span.rstrip('/')}/".startswith(d) for d in ignored):
                continue
            if not (ROOT / span).exists():
                missing.append(span)
        elif first in modules and not (PACKAGE / span).exists():
            missing.append(f"{span} (under {PACKAGE.relative_to(ROOT)})")
    assert not missing, f"{_rel(page)} names paths that do not exist: {missing}"


def test_make_targets_shown_exist() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = {name for rule in MAKE_RULE.findall(makefile) for name in rule.split()}
    shown = {(_rel(page), t) for page in PAGES for code in _code(page) for t in MAKE.findall(code)}
    assert shown, "no `make` command found in the docs: the parser is broken"
    missing = sorted(f"{where}: make {target}" for where, target in shown if target not in targets)
    assert not missing, f"targets missing from the Makefile: {missing}"


def _korero_commands() -> set[tuple[str, ...]]:
    """Each `korero <sub> [<subsub>]` the docs show, up to its first argument."""
    commands = set()
    for page in PAGES:
        for code in _code(page):
            for rest in KORERO.findall(code):
                words = []
                for token in rest.split():
                    if not WORD.fullmatch(token):
                        break
                    words.append(token)
                if words:
                    commands.add(tuple(words))
    return commands


@pytest.mark.slow
def test_korero_commands_shown_exist() -> None:
    exe = Path(sys.executable).with_name("korero")
    korero = str(exe) if exe.exists() else shutil.which("korero")
    assert korero, "the `korero` command is not installed next to this Python (make setup)"
    commands = sorted(_korero_commands())
    assert ("serve",) in commands, "no `korero serve` found in the docs: the parser is broken"

    def run(words: tuple[str, ...]) -> tuple[tuple[str, ...], int, str]:
        done = subprocess.run(
            [korero, *words, "--help"], capture_output=True, text=True, timeout=60, check=False
        )
        return words, done.returncode, " ".join(done.stderr.strip().splitlines()[-1:])

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, commands))
    failed = [f"korero {' '.join(w)} --help: exit {rc} {err}" for w, rc, err in results if rc]
    assert not failed, failed


@pytest.mark.slow
def test_settings_table_is_generated_from_env_reference() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
