""".gitignore-style rules deciding which files of a workspace are shipped to workers.

The common subset of git's syntax (see `parse_line`), implemented here so the result does
not depend on a git binary or on a third-party matcher's reading of the rules. Rules come
from every `.gitignore` and `.flottaignore` in the workspace (each relative to its own
folder; `.flottaignore` keeps out of workers files that git keeps) and from the caller's
own list; the last matching rule wins.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# Never shipped: version control, caches and virtual environments are local to a machine,
# and an interpreter's bytecode is rebuilt by the worker's own Python anyway.
ALWAYS_IGNORED = (".git/", ".hg/", ".svn/", "__pycache__/", ".venv/", "*.pyc")


@dataclass(frozen=True)
class Rule:
    """One pattern line, compiled: where it applies from and what it matches."""

    base: str  # the folder of the ignore file, relative to the workspace ("" for its root)
    pattern: str  # the line as written, for messages
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool

    def matches(self, path: str, is_dir: bool) -> bool:
        """Whether the rule matches `path` (relative to the workspace root)."""
        if self.dir_only and not is_dir:
            return False
        if self.base:
            if not path.startswith(self.base + "/"):
                return False
            path = path[len(self.base) + 1 :]
        return self.regex.fullmatch(path) is not None


def parse_line(line: str, base: str = "") -> Rule | None:
    """A rule from one line of an ignore file, or None for blanks and comments.

    - blank lines and lines starting with `#` are skipped (`\\#` is a literal `#`);
    - `!pattern` re-includes what an earlier pattern excluded, except below an excluded
      folder (as in git: an excluded folder is never entered);
    - a trailing `/` matches folders only;
    - a `/` at the start or in the middle anchors the pattern to the folder of the ignore
      file; without one it matches a name at any depth below it;
    - `*` and `?` never match `/`; `[abc]`, `[a-z]`, `[!a]` are character classes;
    - `**/` at the start, `/**/` in the middle and `/**` at the end span any folders.
    """
    text = line.rstrip("\n").rstrip("\r")
    # Trailing spaces are dropped unless escaped with a backslash, as git does.
    stripped = text.rstrip(" ")
    if stripped.endswith("\\") and len(stripped) < len(text):
        stripped += " "
    text = stripped
    if not text or text.startswith("#"):
        return None
    negated = text.startswith("!")
    if negated or text.startswith(("\\!", "\\#")):  # `\!`, `\#`: literal first characters
        text = text[1:]
    dir_only = text.endswith("/")
    text = text.rstrip("/")
    if not text:
        return None
    anchored = "/" in text
    text = text.lstrip("/")
    body = _translate(text)
    regex = body if anchored else f"(?:.*/)?{body}"
    return Rule(base.strip("/"), line.strip(), re.compile(regex, re.DOTALL), negated, dir_only)


def _translate(pattern: str) -> str:
    """A glob with git's `**` rules as a regular expression over `/`-separated paths."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**", i):
            at_start = i == 0 or pattern[i - 1] == "/"
            at_end = i + 2 == n or pattern[i + 2] == "/"
            if at_start and at_end:
                if i + 2 == n:  # `x/**` (or a lone `**`): everything below
                    out.append(".*")
                    i += 2
                else:  # `**/` : zero or more whole folders
                    out.append("(?:.*/)?")
                    i += 3
                continue
            out.append("[^/]*")  # other runs of stars are plain stars
            while i < n and pattern[i] == "*":
                i += 1
            continue
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = _class_end(pattern, i)
            if end < 0:
                out.append(re.escape(c))
            else:
                inner = pattern[i + 1 : end]
                if inner.startswith("!") or inner.startswith("^"):
                    inner = "^" + inner[1:]
                inner = inner.replace("\\", "\\\\")
                out.append(f"(?!/)[{inner}]")
                i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def _class_end(pattern: str, start: int) -> int:
    """The index of the `]` closing the class opened at `start`, or -1 if none does."""
    i = start + 1
    if i < len(pattern) and pattern[i] in "!^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1  # a `]` first in the class is a member
    while i < len(pattern):
        if pattern[i] == "]":
            return i
        i += 1
    return -1


class IgnoreRules:
    """An ordered list of rules; the last one matching a path decides."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: list[Rule] = list(rules)

    @classmethod
    def from_lines(cls, lines: Iterable[str], base: str = "") -> IgnoreRules:
        return cls(r for r in (parse_line(line, base) for line in lines) if r is not None)

    def extend(self, lines: Iterable[str], base: str = "") -> None:
        """Add the rules of an ignore file found in folder `base` (after those before)."""
        self.rules += [r for r in (parse_line(line, base) for line in lines) if r is not None]

    def decides(self, path: str, is_dir: bool) -> bool:
        """Whether rules alone exclude this entry (its parent folders are not consulted)."""
        excluded = False
        for rule in self.rules:
            if rule.matches(path, is_dir):
                excluded = not rule.negated
        return excluded

    def ignored(self, path: str, is_dir: bool = False) -> bool:
        """Whether `path` stays out, including because a folder above it is excluded."""
        parts = path.strip("/").split("/")
        for depth in range(1, len(parts)):
            if self.decides("/".join(parts[:depth]), is_dir=True):
                return True
        return self.decides("/".join(parts), is_dir)
