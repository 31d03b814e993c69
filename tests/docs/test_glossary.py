"""The zh_CN catalogs follow the glossary of docs/contributing-docs.md (section "Chinese glossary").

Every translated message whose English text (inline code left out) contains a glossary word must use the
glossary's Chinese term, and no message may use a rejected variant (a bare 块, 拷贝, 首 token 时间, ...)."""

from __future__ import annotations

import re

import polib
import pytest

from helpers import ROOT

pytestmark = pytest.mark.docs
CATALOGS = ROOT / "locales" / "zh_CN" / "LC_MESSAGES"

#: Rejected variants: a 块 that is neither 数据块 nor KV 块 (一块/每块/单块/多块 GPU and 模块 are other words).
REJECTED = {
    "bare 块": re.compile(r"(?<!数据)(?<!KV )(?<![一每单多模])块"),
    "拷贝": re.compile("拷贝"),
    "首 token 时间/延迟 with spaces": re.compile(r"首\s+token"),
    "worker left in English": re.compile(r"(?<![`_a-z])[Ww]orkers?(?![`_a-z])"),
    "KV Cache without a space before Chinese": re.compile("KV Cache(?=[\u4e00-\u9fff])"),
}


def glossary() -> list[tuple[str, str]]:
    rows = [line for line in _glossary_section().splitlines() if line.startswith("| ")][1:]  # without the header
    pairs = []
    for row in rows:
        english, chinese = (cell.strip() for cell in row.strip("|").split("|")[:2])
        pairs.append((english, chinese))
    return pairs


def _glossary_section() -> str:
    return (ROOT / "docs" / "contributing-docs.md").read_text(encoding="utf-8").split("(zh-glossary)=", 1)[1]


def _messages():
    own = _glossary_section()  # the glossary's own cells and notes quote the rejected variants
    for path in sorted(CATALOGS.rglob("*.po")):
        if path.name == "sphinx.po":  # the theme's strings: not our prose
            continue
        name = path.relative_to(CATALOGS).as_posix()
        for entry in polib.pofile(str(path)):
            if entry.msgid and entry.msgstr and entry.msgid != entry.msgstr and not (
                    name == "contributing-docs.po" and entry.msgid in own):
                yield name, entry


def test_glossary_table_is_there():
    terms = dict(glossary())
    assert terms["chunk"] == "数据块" and terms["block"] == "KV 块" and terms["worker"] == "工作进程"
    assert terms["copy"] == "复制" and terms["time to first token (TTFT)"] == "首token延迟"


def test_translations_use_the_glossary_terms():
    wrong = []
    for name, entry in _messages():
        english = re.sub(r"`[^`]*`|\([^)]*\.(?:png|svg)\)|https?://\S+", "", entry.msgid)
        for term, chinese in glossary():
            word = term.split(" (")[0]
            if re.search(rf"\b{re.escape(word)}(?:s|es)?\b", english, re.I) and chinese not in entry.msgstr:
                wrong.append(f"{name}: {term!r} -> expected {chinese!r}: {entry.msgstr[:120]!r}")
    assert not wrong, "\n".join(wrong[:30])


def test_no_rejected_variants():
    wrong = [f"{name}: {label}: {entry.msgstr[:120]!r}" for name, entry in _messages()
             for label, pattern in REJECTED.items() if pattern.search(entry.msgstr)]
    assert not wrong, "\n".join(wrong[:30])
