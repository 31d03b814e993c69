#!/usr/bin/env bash
# Documentation checks that need no vLLM engine.
#   scripts/check_docs.sh           # catalogs in sync + 100% translated (fuzzy = untranslated)
#   scripts/check_docs.sh update    # regenerate the catalogs after editing English pages
set -euo pipefail
cd "$(dirname "$0")/.."
sphinx-build -E -q -b gettext -c . docs build/gettext
sphinx-intl update -p build/gettext -l zh_CN -d locales --no-obsolete >/dev/null
if [[ "${1:-}" == "update" ]]; then
  echo "catalogs updated: translate new and fuzzy entries in locales/zh_CN/LC_MESSAGES"
  exit 0
fi
git diff --exit-code --stat -- locales/ || {
  echo "stale catalogs: run scripts/check_docs.sh update, translate, and commit locales/" >&2; exit 1; }
untracked=$(git ls-files --others --exclude-standard -- locales/)
[[ -z "$untracked" ]] || { echo "new catalogs not committed: $untracked" >&2; exit 1; }
python tests/docs/check_translations.py --lang zh_CN --min 100
