#!/usr/bin/env bash
# Documentation checks.
#   scripts/check_docs.sh           # catalogs in sync + 100% zh_CN translated (fuzzy = untranslated); no vLLM
#   scripts/check_docs.sh update    # regenerate the catalogs after editing English pages
#   scripts/check_docs.sh pages     # the pages' >>> examples and the notebook, re-run by nbval against its
#                                   # stored outputs on vLLM with the tiny model (docs/conftest.py); scripts/test.sh runs it
#   scripts/check_docs.sh all       # everything CI runs for the docs: pages, catalogs, both builds,
#                                   # browser check, every example on vLLM (tiny model)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

catalogs() {
  # -E: pages generated from the code (settings table, CLI help) must be re-read every time.
  sphinx-build -E -q -b gettext -c . docs build/gettext
  sphinx-intl update -p build/gettext -l zh_CN -d locales --no-obsolete >/dev/null
  python scripts/theme_catalog.py   # the theme's strings (furo, search page): sphinx.po and sphinx.js
}

case "${1:-check}" in
  update)
    catalogs
    echo "catalogs updated: translate new and fuzzy entries in locales/zh_CN/LC_MESSAGES"
    ;;
  check)
    catalogs
    git diff --exit-code --stat -- locales/ || {
      echo "stale catalogs: run scripts/check_docs.sh update, translate, and commit locales/" >&2; exit 1; }
    untracked=$(git ls-files --others --exclude-standard -- locales/)
    [[ -z "$untracked" ]] || { echo "new catalogs not committed: $untracked" >&2; exit 1; }
    python tests/docs/check_translations.py --lang zh_CN --min 100
    ;;
  pages)
    python -m pytest -q -p no:cacheprovider --doctest-glob='*.md' --nbval --nbval-current-env \
      --nbval-sanitize-with docs/notebooks/nbval_sanitize.cfg docs
    ;;
  all)
    export DOCS_TINY_MODEL="${DOCS_TINY_MODEL:-$PWD/build/tiny-model}"
    python tests/tiny_model.py "$DOCS_TINY_MODEL" >/dev/null
    bash scripts/check_docs.sh pages
    python -m pytest -q -p no:cacheprovider -m "docs or vllm" tests/docs   # builds both languages itself
    ;;
  *) echo "usage: $0 [check|update|pages|all]" >&2; exit 2 ;;
esac
