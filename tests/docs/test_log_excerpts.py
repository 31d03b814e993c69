"""Log excerpts committed in the docs still look like what the code prints.

The excerpts (docs/_static/logs/*.log, included by the pages; the notebook's stored outputs; log lines
quoted inline on a page, like `kvoffload hit tokens: 0`) were captured from real runs and are rewritten only
with DOCS_UPDATE_LOGS=1 (tests/docs/test_examples.py). Without a check, renaming a log message leaves the
pages showing a line nobody will ever see again. So every line is matched against the code, without
running it:

- a vLLM log record, ``(EngineCore pid=1) INFO 12-04 23:40:07 [scheduler.py:319] message``: ``message``
  must be an instance of one of the format strings logged (``logger.info("...", ...)``) in that module of
  src/kvoffload, or of vLLM for vLLM's own records (line numbers are not compared: they move with every edit);
- any other line: an instance of a ``print()`` of examples/*.py;
- an inline quote: its text ("…" for anything, any word or number for a placeholder) appears in
  what kvoffload logs or raises.
"""

from __future__ import annotations

import ast
import json
import re
from functools import lru_cache
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.docs

RECORD = re.compile(r"^\((?P<proc>[\w ]+) pid=\d+\) (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                    r"\d\d-\d\d \d\d:\d\d:\d\d \[(?P<file>[\w.]+\.py):\d+\] (?P<msg>.*)$")
LEVELS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "info_once", "warning_once"}
_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*\d*(?:\.\d+)?([diouxXeEfFgGcrs%])")
_NUMBER = r"(?:-?\d+(?:\.\d+)?(?:e[-+]?\d+)?|nan|inf)"


def _percent_regex(fmt: str) -> str:
    """A %-format string as a regex of its instances."""
    out, pos = [], 0
    for m in _SPEC.finditer(fmt):
        out.append(re.escape(fmt[pos:m.start()]))
        kind = m.group(1)
        out.append("%" if kind == "%" else r"-?\d+" if kind in "diouxXc" else _NUMBER if kind in "eEfFgG" else ".*?")
        pos = m.end()
    out.append(re.escape(fmt[pos:]))
    return "".join(out)


def _logged_formats(path: Path) -> list[str]:
    """The format strings of every logger call in a module (implicit concatenation joined by ast)."""
    formats = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in LEVELS
                and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            target = node.func.value
            name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")
            if "log" in name.lower():
                formats.append(node.args[0].value)
    return formats


@lru_cache(maxsize=None)
def kvoffload_formats() -> dict[str, list[str]]:
    """Module file name -> the format strings it logs, for src/kvoffload."""
    formats: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "kvoffload").rglob("*.py")):
        formats.setdefault(path.name, []).extend(_logged_formats(path))
    return formats


@lru_cache(maxsize=None)
def vllm_formats(file_name: str) -> list[str]:
    vllm = pytest.importorskip("vllm")
    return [f for path in Path(vllm.__file__).parent.rglob(file_name) for f in _logged_formats(path)]


def _fstring_regex(node: ast.AST) -> str:
    if isinstance(node, ast.Constant):
        return re.escape(str(node.value))
    if isinstance(node, ast.JoinedStr):
        return "".join(re.escape(v.value) if isinstance(v, ast.Constant) else ".+?" for v in node.values)
    return ".+?"


@lru_cache(maxsize=None)
def example_prints() -> list[str]:
    """Regexes of what every print() of examples/*.py writes (its arguments joined by spaces)."""
    found = []
    for path in sorted((ROOT / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print" and node.args:
                found.append(" ".join(_fstring_regex(a) for a in node.args))
    return found


def check_line(line: str, formats: dict[str, list[str]] | None = None) -> str | None:
    """None if the line is something the code prints, else why not."""
    formats = kvoffload_formats() if formats is None else formats
    record = RECORD.match(line)
    if record:
        name, msg = record["file"], record["msg"]
        candidates = formats.get(name) if name in formats else vllm_formats(name)
        if not candidates:
            return f"no module {name} logs anything"
        if not any(re.fullmatch(_percent_regex(f), msg) for f in candidates):
            return f"{name} logs no message of this form"
        return None
    if not any(re.fullmatch(p, line) for p in example_prints()):
        return "no print() of examples/*.py writes this"
    return None


def log_excerpts() -> dict[str, list[str]]:
    """Where each excerpt lives -> its lines (blank lines and '# ' headers left out)."""
    excerpts = {}
    pages = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "docs").rglob("*.md"))
    for name in sorted(set(re.findall(r"literalinclude\}\s+_static/logs/(\S+)", pages))):
        lines = (ROOT / "docs" / "_static" / "logs" / name).read_text(encoding="utf-8").splitlines()
        excerpts[f"docs/_static/logs/{name}"] = [l for l in lines if l.strip() and not l.startswith("# ")]
    for nb in sorted((ROOT / "docs").rglob("*.ipynb")):
        for i, cell in enumerate(json.loads(nb.read_text(encoding="utf-8"))["cells"]):
            for out in cell.get("outputs", []):
                if out.get("output_type") == "stream":
                    text = "".join(out["text"]).splitlines()
                    records = [l for l in text if RECORD.match(l)]
                    if records:
                        excerpts[f"{nb.relative_to(ROOT)} cell {i} {out['name']}"] = records
    return excerpts


def test_every_included_log_is_checked():
    names = set(log_excerpts())
    on_disk = {f"docs/_static/logs/{p.name}" for p in (ROOT / "docs" / "_static" / "logs").glob("*.log")}
    assert on_disk <= names, f"logs no page includes: {sorted(on_disk - names)}"
    assert any("ipynb" in n for n in names), "the notebook's stored log output was not found"


@pytest.mark.parametrize("where", sorted(log_excerpts()))
def test_log_excerpt_matches_the_code(where):
    lines = log_excerpts()[where]
    assert lines, where
    bad = [f"{line!r}: {why}" for line in lines if (why := check_line(line))]
    assert not bad, f"{where} shows lines the code no longer prints (regenerate with DOCS_UPDATE_LOGS=1 " \
                    f"python -m pytest tests/docs/test_examples.py, or refresh the notebook):\n" + "\n".join(bad)


def test_key_lines_are_covered():
    """The lines the pages explain are in the excerpts: a lookup, a store and a load."""
    text = "\n".join(l for lines in log_excerpts().values() for l in lines)
    for needle in ("kvoffload hit tokens: ", "need to load: ", "Storing KV cache for ", "Loaded KV cache for "):
        assert needle in text, needle


def test_checker_rejects_a_renamed_log_line():
    """Negative control: with the lookup message renamed in the code, the committed excerpts fail."""
    renamed = {name: [f.replace("kvoffload hit tokens", "kvoffload hits") for f in fs]
               for name, fs in kvoffload_formats().items()}
    lookup = next(l for lines in log_excerpts().values() for l in lines if "kvoffload hit tokens" in l)
    assert check_line(lookup) is None
    assert check_line(lookup, renamed) == "scheduler.py logs no message of this form"
    assert check_line("Cold time to first token: 0.098 seconds") is not None  # a print() that does not exist


INLINE = re.compile(r"`((?:kvoffload[: ] |kvoffload |Storing KV cache|Loaded KV cache|Reqid: )[^`]*)`")


def inline_quotes() -> list[tuple[str, str]]:
    """Log lines quoted in a page's text (commands like `kvoffload config` and metric names left out)."""
    quotes = []
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for quote in INLINE.findall(page.read_text(encoding="utf-8")):
            if not re.match(r"kvoffload (config|cache|serve)\b", quote):
                quotes.append((page.name, quote))
    return quotes


def _written_texts() -> list[str]:
    """What src/kvoffload logs or raises, with every placeholder as a NUL character."""
    texts = [_SPEC.sub("\0", f) for fs in kvoffload_formats().values() for f in fs]
    for path in sorted((ROOT / "src" / "kvoffload").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and node.exc.args:
                arg = node.exc.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    texts.append(arg.value)
                elif isinstance(arg, ast.JoinedStr):
                    texts.append("".join(v.value if isinstance(v, ast.Constant) else "\0" for v in arg.values))
    return texts


def _quote_regex(quote: str) -> str:
    """A quoted fragment as a regex over a written text: "…" is anything, any word or number may be a
    placeholder (the quote shows a value where the code has %s or %d)."""
    out = []
    for token in re.findall(r"…|\.\.\.|\d+(?:\.\d+)?|\w+|\s+|.", quote):
        if token in ("…", "..."):
            out.append(".*")
        elif re.fullmatch(r"\w+|\d+(?:\.\d+)?", token):
            out.append(f"(?:{re.escape(token)}|\0)")
        else:
            out.append(re.escape(token))
    return "".join(out)


def test_inline_log_quotes_match_the_code():
    texts = _written_texts()
    quotes = inline_quotes()
    assert len(quotes) >= 4, quotes
    bad = [f"{page}: `{quote}`" for page, quote in quotes
           if not any(re.search(_quote_regex(quote), text) for text in texts)]
    assert not bad, "quoted log lines that kvoffload no longer logs or raises:\n" + "\n".join(bad)
    assert not any(re.search(_quote_regex("kvoffload hits: 0"), text) for text in texts)  # negative control
