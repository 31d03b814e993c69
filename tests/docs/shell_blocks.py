"""The shell commands shown on the documentation pages (tests/docs/test_shell_commands.py runs or lists them).

A command is one line of a ``bash``/``sh``/``console`` code block of ``docs/*.md`` (backslash continuations
joined, comments and ``$ `` prompts removed), or of a file such a page includes with ``literalinclude`` and
``:language: bash`` (only the lines it shows: ``:start-after:``/``:end-before:``/``:lines:``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT

DOCS = ROOT / "docs"
SHELL_LANGUAGES = {"bash", "sh", "shell", "console", "shell-session", "zsh"}
_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,}|:{3,})\s*(?P<info>[^\n]*)\n(?P<body>.*?)^(?P=fence)\s*$", re.M | re.S)
_DIRECTIVE = re.compile(r"^\{(?P<name>[\w-]+)\}\s*(?P<arg>.*)$")


@dataclass(frozen=True)
class Command:
    page: str       # docs/quickstart.md, or docs/quickstart.md > examples/online_serve.sh
    line: int       # line of the page (or of the included file) where the command starts
    text: str       # the command, continuations joined with a space, without comments or prompt


def _options(body: str) -> tuple[dict[str, str], str]:
    options, lines = {}, body.splitlines()
    while lines and lines[0].startswith(":"):
        key, _, value = lines.pop(0)[1:].partition(":")
        options[key.strip()] = value.strip().strip('"').strip("'")
    return options, "\n".join(lines)


def _strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` outside quotes."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def commands_of(text: str, page: str, first_line: int) -> list[Command]:
    commands, pending, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), first_line):
        line = raw[2:] if raw.startswith("$ ") else raw
        line = _strip_comment(line) if not pending else line.rstrip()
        if not pending and not line.strip():
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        commands.append(Command(page, start, (pending + line.strip()).strip()))
        pending = ""
    return commands


def _included(page: Path, arg: str, options: dict[str, str]) -> tuple[str, int, str]:
    path = (page.parent / arg).resolve()
    text = path.read_text(encoding="utf-8")
    first = 1
    if "start-after" in options:
        head, _, text = text.partition(options["start-after"])
        first += head.count("\n")
        text = text.split("\n", 1)[1] if "\n" in text else ""
        first += 1
    if "end-before" in options:
        text = text.partition(options["end-before"])[0]
    if "lines" in options:
        raise NotImplementedError(":lines: in a shell literalinclude")  # not used yet: add it when it is
    return text, first, str(path.relative_to(ROOT))


def shell_commands(pages: list[Path] | None = None) -> list[Command]:
    found = []
    for page in pages or sorted(DOCS.glob("*.md")):
        source = page.read_text(encoding="utf-8")
        name = str(page.relative_to(ROOT))
        for block in _FENCE.finditer(source):
            info = block["info"].strip()
            line = source[:block.start()].count("\n") + 2
            directive = _DIRECTIVE.match(info)
            if directive is None:
                if info.split(" ")[0].lower() in SHELL_LANGUAGES:
                    found += commands_of(block["body"], name, line)
                continue
            options, body = _options(block["body"])
            kind, arg = directive["name"], directive["arg"].strip()
            if kind in ("code-block", "code", "sourcecode") and arg.lower() in SHELL_LANGUAGES:
                found += commands_of(body, name, line + len(options))
            elif kind == "literalinclude" and options.get("language", "").lower() in SHELL_LANGUAGES:
                text, first, included = _included(page, arg, options)
                found += commands_of(text, f"{name} > {included}", first)
    return found
