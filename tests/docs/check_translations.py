"""Report translation coverage of the catalogs; fuzzy entries count as untranslated.

    python tests/docs/check_translations.py --lang zh_CN --min 100
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import polib

ROOT = Path(__file__).resolve().parents[2]


def coverage(lang: str = "zh_CN") -> dict[str, dict]:
    """Per .po file: total, translated (non-fuzzy, non-empty), fuzzy and untranslated msgids."""
    report = {}
    for path in sorted((ROOT / "locales" / lang / "LC_MESSAGES").rglob("*.po")):
        po = polib.pofile(str(path))
        entries = [e for e in po if e.msgid and not e.obsolete]
        fuzzy = [e.msgid for e in entries if "fuzzy" in e.flags]
        untranslated = [e.msgid for e in entries if "fuzzy" not in e.flags
                        and not (e.msgstr or (e.msgstr_plural and all(e.msgstr_plural.values())))]
        report[str(path.relative_to(ROOT))] = {
            "total": len(entries),
            "translated": len(entries) - len(fuzzy) - len(untranslated),
            "fuzzy": fuzzy,
            "untranslated": untranslated,
            "obsolete": len(po.obsolete_entries()),
        }
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lang", default="zh_CN")
    parser.add_argument("--min", type=float, default=100.0, help="minimum percentage translated")
    args = parser.parse_args(argv)
    report = coverage(args.lang)
    total = sum(r["total"] for r in report.values())
    done = sum(r["translated"] for r in report.values())
    for name, r in report.items():
        missing = r["fuzzy"] + r["untranslated"]
        print(f"{name}: {r['translated']}/{r['total']} translated, {len(r['fuzzy'])} fuzzy, "
              f"{len(r['untranslated'])} untranslated, {r['obsolete']} obsolete")
        for msgid in missing[:5]:
            print(f"    missing: {msgid[:100]!r}")
    percent = 100.0 * done / total if total else 0.0
    print(f"{args.lang}: {done}/{total} messages translated ({percent:.1f}%)")
    return 0 if total and percent >= args.min else 1


if __name__ == "__main__":
    sys.exit(main())
