"""Sphinx extension: ``<link rel="alternate" hreflang>`` between the languages of each page.

The site is one folder per language (build/html/en, build/html/zh_CN, see scripts/build_docs.sh), so the
same page in another language is ``../<code>/<pagename>.html`` from the language root. Every page lists
itself and its translations, plus ``x-default`` (English), as search engines ask. Languages come from
``html_context["languages"]`` (the switcher's list). The links are relative, so the site works under any
prefix and from ``file://``; set ``kvoffload_site_url`` (the URL of the folder that holds en/ and zh_CN/)
for absolute ones, which search engines prefer.
"""

from __future__ import annotations

from html import escape
from typing import Any


def alternate_links(pagename: str, file_suffix: str, content_root: str, languages: list[tuple[str, str]],
                    site_url: str = "") -> list[tuple[str, str]]:
    """(hreflang, href) for every language of ``pagename`` and x-default (the first language)."""
    base = site_url.rstrip("/") + "/" if site_url else f"{content_root}../"
    links = [(code.replace("_", "-"), f"{base}{code}/{pagename}{file_suffix}") for code, _label in languages]
    if links:
        links.append(("x-default", links[0][1]))
    return links


def _page_context(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    if app.builder.format != "html":
        return
    languages = (app.config.html_context or {}).get("languages") or []
    links = alternate_links(pagename, context.get("file_suffix", ".html"), context.get("content_root", ""),
                            languages, app.config.kvoffload_site_url)
    tags = "".join(f'\n<link rel="alternate" hreflang="{escape(lang)}" href="{escape(href)}" />'
                   for lang, href in links)
    context["metatags"] = context.get("metatags", "") + tags + "\n"


def setup(app: Any) -> dict:
    app.add_config_value("kvoffload_site_url", "", "html", types=[str])
    app.connect("html-page-context", _page_context)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
