"""What `docker build` sends as the build context, given `.dockerignore`.

Docker's rules, for the patterns this repository uses: patterns are matched
against slash-separated paths relative to the context root (`*` within one
path element, `**` across any number of them), a pattern that matches a
directory also covers everything under it, a leading `!` lets a path back in,
and the last matching pattern decides.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DockerIgnore", "context_files"]


def _regex(pattern: str) -> re.Pattern[str]:
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class DockerIgnore:
    """The patterns of one `.dockerignore`, in order: (regex, excludes)."""

    rules: tuple[tuple[re.Pattern[str], bool], ...]
    reincluded: tuple[str, ...] = ()
    """The `!` patterns, to know which excluded directories may still hold context files."""

    @classmethod
    def read(cls, path: Path) -> DockerIgnore:
        rules = []
        reincluded = []
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            excludes = not line.startswith("!")
            pattern = line.lstrip("!").strip("/")
            rules.append((_regex(pattern), excludes))
            if not excludes:
                reincluded.append(pattern)
        return cls(tuple(rules), tuple(reincluded))

    def excludes(self, relative: str) -> bool:
        """Whether the file at `relative` (slash-separated) stays out of the context."""
        parts = relative.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        verdict = False
        for regex, excludes in self.rules:
            if any(regex.match(prefix) for prefix in prefixes):
                verdict = excludes
        return verdict

    def may_hold_context(self, directory: str) -> bool:
        """False for an excluded directory that no `!` pattern reaches into (not walked)."""
        if not self.excludes(directory):
            return True
        return any(p.startswith(directory + "/") or p == directory for p in self.reincluded)


def context_files(root: Path) -> Iterator[str]:
    """Every file of `root` that `docker build root` would send, as relative paths."""
    ignore = DockerIgnore.read(root / ".dockerignore")
    for current, dirs, files in os.walk(root):
        base = Path(current).relative_to(root).as_posix()
        prefix = "" if base == "." else base + "/"
        dirs[:] = sorted(d for d in dirs if ignore.may_hold_context(prefix + d))
        for name in sorted(files):
            if not ignore.excludes(prefix + name):
                yield prefix + name
