#!/usr/bin/env bash
# Build the documentation in both languages: build/html/en and build/html/zh_CN, plus a root
# build/html/index.html that sends the browser to its language.
#   scripts/build_docs.sh            # strict: -W --keep-going -n
#   SPHINXOPTS="-j auto" scripts/build_docs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${DOCS_OUT:-build/html}"
python benchmarks/plot.py >/dev/null          # plots + results table from benchmarks/results/*.json
for lang in en zh_CN; do
  # jieba logs DEBUG lines on stderr for zh_CN; they are not warnings.
  sphinx-build -E -W --keep-going -n -q ${SPHINXOPTS:-} -c . -D language="$lang" \
    -d "build/doctrees/$lang" docs "$OUT/$lang" 2> >(grep -vE "jieba|^Loading model cost|^Prefix dict has been|^Building prefix dict|^Dumping model|^$" >&2)
done
rm -rf "$OUT/jupyter_execute" build/jupyter_execute   # myst-nb's executed copies: not part of the site
cat > "$OUT/index.html" <<'HTML'
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>kvoffload documentation</title>
<meta http-equiv="refresh" content="0; url=en/index.html">
<script>if ((navigator.language || "").toLowerCase().startsWith("zh")) location.replace("zh_CN/index.html");</script>
</head><body><p><a href="en/index.html">English</a> · <a href="zh_CN/index.html" lang="zh-CN">简体中文</a></p></body></html>
HTML
echo "built $OUT/en and $OUT/zh_CN"
