"""The zh_CN catalog of the theme's own strings: what furo and Sphinx's search page show around our text.

Sphinx translates template strings (``_("Next")``, ``{% trans %}Back to top{% endtrans %}``) through the
``sphinx`` message domain, looking in ``locale_dirs`` first and in Sphinx's own catalog after; the search
page's JavaScript strings come from one ``sphinx.js`` file, ours if ``locale_dirs`` has one. Sphinx 8.2.3's
zh_CN catalog lacks furo's strings (Next, Previous, Back to top, ...) and has the search summary only under
an older msgid, so those pages showed English.

    python scripts/theme_catalog.py          # update locales/zh_CN/LC_MESSAGES/sphinx.po (new msgids empty,
                                             # stale ones dropped) and regenerate sphinx.js from it
    python scripts/theme_catalog.py --check  # exit 1 if either file is not what the update would write

The msgids are extracted from the installed furo templates and ours (docs/_templates) exactly as Jinja's
i18n extension sees them, and from Sphinx's search JavaScript; only those Sphinx's zh_CN catalog does not
already translate are kept, so everything else stays Sphinx's translation.
"""

from __future__ import annotations

import argparse
import gettext
import json
import re
import sys
from pathlib import Path

import polib

ROOT = Path(__file__).resolve().parents[1]
LANG = "zh_CN"
OUT = ROOT / "locales" / LANG / "LC_MESSAGES"


def _sphinx_dir() -> Path:
    import sphinx

    return Path(sphinx.__file__).parent


def template_messages() -> list[tuple[str, str | None]]:
    """(msgid, msgid_plural) of every translatable string in furo's templates and in docs/_templates."""
    import furo
    from jinja2 import Environment
    from jinja2.ext import babel_extract

    env_options = {"extensions": "jinja2.ext.i18n"}
    found: list[tuple[str, str | None]] = []
    dirs = [Path(furo.__file__).parent / "theme" / "furo", ROOT / "docs" / "_templates"]
    Environment(extensions=["jinja2.ext.i18n"])  # the same Jinja features Sphinx's template bridge turns on
    for root in dirs:
        for path in sorted(root.rglob("*.html")):
            with path.open("rb") as f:
                for _line, _func, message, _comments in babel_extract(f, ["_", "gettext", "ngettext"], [],
                                                                      env_options):
                    if isinstance(message, tuple):
                        singular, plural = (m for m in message if m is not None)
                        found.append((singular, plural))
                    elif message:
                        found.append((message, None))
    return found


def js_messages() -> list[tuple[str, str | None]]:
    """(msgid, msgid_plural) of the strings Sphinx's search and highlight JavaScript translates."""
    found = []
    for path in sorted((_sphinx_dir() / "themes" / "basic" / "static").glob("*.js*")):
        text = path.read_text(encoding="utf-8")
        for m in re.finditer(r'(?:\b_|gettext)\(\s*"((?:[^"\\]|\\.)+)"\s*\)', text):
            found.append((json.loads(f'"{m.group(1)}"'), None))
        for m in re.finditer(r'ngettext\(\s*"((?:[^"\\]|\\.)+)",\s*"((?:[^"\\]|\\.)+)"', text, re.S):
            found.append((json.loads(f'"{m.group(1)}"'), json.loads(f'"{m.group(2)}"')))
    return found


def _sphinx_js() -> dict:
    text = (_sphinx_dir() / "locale" / LANG / "LC_MESSAGES" / "sphinx.js").read_text(encoding="utf-8")
    return json.loads(text[text.index("(") + 1: text.rindex(")")])


def missing_messages() -> tuple[list[tuple[str, str | None]], set[str]]:
    """Messages Sphinx's own zh_CN catalogs leave in English; the set holds the JavaScript ones."""
    builtin = gettext.translation("sphinx", str(_sphinx_dir() / "locale"), [LANG])
    js_builtin = _sphinx_js()["messages"]
    missing, seen, js = [], set(), set()
    for msgid, plural in template_messages():
        translated = builtin.ngettext(msgid, plural, 2) if plural else builtin.gettext(msgid)
        if translated in (msgid, plural) and msgid not in seen:
            missing.append((msgid, plural))
            seen.add(msgid)
    for msgid, plural in js_messages():
        if msgid not in js_builtin:
            js.add(msgid)
            if msgid not in seen:
                missing.append((msgid, plural))
                seen.add(msgid)
    return missing, js


def build() -> tuple[str, str]:
    """The text of sphinx.po (existing translations kept) and of sphinx.js."""
    path = OUT / "sphinx.po"
    old = {e.msgid: e for e in polib.pofile(str(path))} if path.exists() else {}
    po = polib.POFile(wrapwidth=0)
    po.metadata = {"Project-Id-Version": "kvoffload theme strings", "Language": LANG,
                   "MIME-Version": "1.0", "Content-Type": "text/plain; charset=utf-8",
                   "Content-Transfer-Encoding": "8bit", "Plural-Forms": "nplurals=1; plural=0;"}
    missing, js = missing_messages()
    for msgid, plural in missing:
        prev = old.get(msgid)
        entry = polib.POEntry(msgid=msgid, msgstr="" if plural else (prev.msgstr if prev else ""))
        if plural:
            entry.msgid_plural = plural
            entry.msgstr_plural = {0: prev.msgstr_plural.get(0, "") if prev else ""}
        if msgid in js:
            entry.comment = "search page JavaScript (sphinx.js)"
        po.append(entry)
    catalog = _sphinx_js()
    for entry in po:
        if entry.msgid in js:
            if entry.msgid_plural and entry.msgstr_plural.get(0):
                catalog["messages"][entry.msgid] = [entry.msgstr_plural[0]]
            elif entry.msgstr:
                catalog["messages"][entry.msgid] = entry.msgstr
    catalog["messages"] = dict(sorted(catalog["messages"].items()))
    js_text = ("Documentation.addTranslations(" + json.dumps(catalog, ensure_ascii=False, indent=4) + ");\n")
    return str(po), js_text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    po_text, js_text = build()
    targets = {OUT / "sphinx.po": po_text, OUT / "sphinx.js": js_text}
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, text in targets.items()
                 if not p.exists() or p.read_text(encoding="utf-8") != text]
        if stale:
            print(f"stale theme catalog: {', '.join(stale)}; run python scripts/theme_catalog.py", file=sys.stderr)
            return 1
        return 0
    for p, text in targets.items():
        p.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
