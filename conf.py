"""Sphinx configuration of the kvoffload documentation (English source, zh_CN through gettext).

Build both languages with ``scripts/build_docs.sh``; see docs/contributing-docs.md for the workflow.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))           # autodoc and the settings table without installing
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

project = "kvoffload"
author = "kvoffload contributors"
copyright = "2026, kvoffload contributors"
try:
    from kvoffload import __version__ as release
except Exception:  # pragma: no cover - the docs still build without the package importable
    release = "0.1.0"
version = release

extensions = [
    "myst_nb",                  # bundles myst_parser; list only one of them
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx_copybutton",
    "kvoffload_docs",           # docs/_ext/kvoffload_docs.py: generated settings table
    "kvoffload_hreflang",       # docs/_ext/kvoffload_hreflang.py: <link rel="alternate" hreflang> per page
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
root_doc = "index"
exclude_patterns = ["_build", "_static/**", "**/.ipynb_checkpoints", "notebooks/nbval_sanitize.cfg"]
nb_execution_mode = "off"       # nbval executes the notebook in CI; the build shows stored outputs
myst_enable_extensions = ["attrs_block", "colon_fence", "deflist", "substitution"]
myst_heading_anchors = 3

# i18n. ABSOLUTE path: Sphinx joins a relative one to docs/, sphinx-intl to the conf.py directory.
language = "en"
locale_dirs = [str(ROOT / "locales")]
gettext_compact = False
gettext_location = False
gettext_uuid = False
# Code blocks stay out of the catalogs: the zh pages show the same tested example code.
gettext_additional_targets: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_mock_imports = ["vllm", "torch", "redis"]

# The copy button leaves out shell and Python prompts, and the output lines of a block that has prompts.
copybutton_prompt_text = r"\$ |>>> |\.\.\. "
copybutton_prompt_is_regexp = True

templates_path = ["docs/_templates"]
html_static_path = ["docs/_static"]
html_css_files = ["kvoffload.css"]
html_theme = "furo"
html_title = f"kvoffload {release}"
html_logo = "docs/_static/logo.svg"
html_favicon = "docs/_static/logo.svg"     # browsers then ask for no /favicon.ico
html_sidebars = {
    "**": [
        "sidebar/brand.html",
        "lang-switcher.html",
        "sidebar/search.html",
        "sidebar/scroll-start.html",
        "sidebar/navigation.html",
        "sidebar/scroll-end.html",
    ]
}
# The switcher compares these codes with Sphinx's own ``language`` template variable.
html_context = {"languages": [("en", "English"), ("zh_CN", "简体中文")]}
html_last_updated_fmt = None
html_copy_source = False
# Chinese search: jieba segments the zh pages (and Sphinx's search JavaScript the query). Our terms
# must be single dictionary words, or a query for "预填充" would look for a word the index split up.
html_search_options = {"dict": str(ROOT / "docs" / "search_dict_zh.txt")}
