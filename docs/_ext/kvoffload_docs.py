"""Sphinx extension: render kvoffload's settings, straight from ``kvoffload.config``, into MyST tables.

A page writes a marker comment on a line of its own; at ``source-read`` time the marker is replaced by
a MyST pipe table generated from the code, so the table is parsed like hand-written Markdown: its text
is extracted by ``sphinx-build -b gettext`` and translated through the catalogs like any other message.

Markers:

``<!-- kvoffload:settings-table -->``
    every key of :data:`kvoffload.config.KEYS`: name, environment variable, type, default, accepted
    values and meaning.
``<!-- kvoffload:env-table -->``
    the environment variables that are not settings (config file, password).
``<!-- kvoffload:config-example -->``
    the real output of ``kvoffload config`` with a valid and an invalid setting, run at build time.
``<!-- kvoffload:cli-help -->``
    the ``--help`` output of every ``kvoffload`` subcommand, from :func:`kvoffload.cli.build_parser`.
``<!-- kvoffload:lmcache-refused -->`` / ``<!-- kvoffload:lmcache-ignored -->``
    LMCache keys that kvoffload refuses (feature not available) or accepts and ignores.
``<!-- kvoffload:bench-results -->``
    the benchmark result tables that ``benchmarks/plot.py`` generates, in the language being built
    (``docs/_static/bench/results.md`` or ``results.<language>.md``), inside a ``notranslate`` container:
    gettext cannot translate a generated file, so plot.py writes each language itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

MARKERS = ("config-example", "cli-help", "settings-table", "env-table", "lmcache-refused", "lmcache-ignored",
           "bench-results")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _yaml_value(value: Any) -> str:
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    return f"`{value}`"


def settings_rows() -> list[dict[str, str]]:
    """One dict per setting, in the order of ``KEYS`` (also used by the tests)."""
    from kvoffload import config

    types = {f.name: str(f.type) for f in dataclasses.fields(config.Settings)}
    rows = []
    for name, key in config.KEYS.items():
        rows.append({
            "name": name,
            "env": f"{config.ENV_PREFIX}{name.upper()}",
            "type": types.get(name, "str").replace(" | None", " or null"),
            "default": _yaml_value(key.default),
            "accepted": key.accepted,
            "help": key.help,
        })
    return rows


def settings_table() -> str:
    lines = [
        "| Setting and environment variable | Type and default | Accepted values | Meaning |",
        "|---|---|---|---|",
    ]
    for row in settings_rows():
        lines.append(
            f"| `{row['name']}`<br>`{row['env']}` | `{row['type']}`<br>{row['default']} "
            f"| {_cell(row['accepted'])} | {_cell(row['help'])} |"
        )
    return "{.settings-table}\n" + "\n".join(lines)  # class via MyST attrs_block, for the CSS


def env_table() -> str:
    from kvoffload import config

    meaning = {
        config.CONFIG_FILE_ENV: "Path of a YAML file of settings (lowest precedence).",
        config.LMCACHE_CONFIG_FILE_ENV: "Read like the previous one, for LMCache configuration files; "
                                        "a KVOFFLOAD_CONFIG_FILE wins on conflicts.",
        config.PASSWORD_ENV: "Password of the Redis/Valkey server; wins over a password in remote_url "
                             "and is never logged.",
    }
    lines = ["| Environment variable | Meaning |", "|---|---|"]
    for name in (config.CONFIG_FILE_ENV, config.LMCACHE_CONFIG_FILE_ENV, config.PASSWORD_ENV):
        lines.append(f"| `{name}` | {_cell(meaning[name])} |")
    return "\n".join(lines)


def lmcache_refused() -> str:
    from kvoffload import config

    lines = ["| LMCache setting | LMCache feature |", "|---|---|"]
    for name, feature in sorted(config.LMCACHE_ONLY_KEYS.items()):
        lines.append(f"| `{name}` | {_cell(feature)} |")
    return "\n".join(lines)


def lmcache_ignored() -> str:
    from kvoffload import config

    return ", ".join(f"`{name}`" for name in sorted(config.LMCACHE_NOOP_KEYS))


def _walk(parser, prefix):
    import argparse

    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, f"{prefix} {name}")


def cli_help() -> str:
    """``--help`` of the ``kvoffload`` command and of every subcommand, from its argparse parser."""
    import os

    from kvoffload.cli import build_parser

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal width: make the page reproducible
    try:
        parts = [f"$ {name} --help\n{sub.format_help().rstrip()}" for name, sub in _walk(build_parser(), "kvoffload")]
    finally:
        if old is None:
            os.environ.pop("COLUMNS")
        else:
            os.environ["COLUMNS"] = old
    body = "\n\n".join(parts).replace("```", "` ` `")
    return "```text\n" + body + "\n```"


def _run_cli(args: list[str], env: dict[str, str]) -> str:
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[2] / "src")
    clean = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": src, "COLUMNS": "100", **env}
    proc = subprocess.run([sys.executable, "-m", "kvoffload.cli", *args], env=clean, capture_output=True,
                          text=True, timeout=120)
    shown = " ".join(f"{k}={v}" for k, v in env.items())
    out = (proc.stdout + proc.stderr).rstrip()
    return f"$ {shown} kvoffload {' '.join(args)}\n{out}\n$ echo $?\n{proc.returncode}"


def config_example() -> str:
    """Real output of ``kvoffload config``, run at build time: a valid and an invalid setting."""
    good = _run_cli(["config"], {"KVOFFLOAD_MAX_LOCAL_CPU_SIZE": "20"})
    bad = _run_cli(["config"], {"KVOFFLOAD_MAX_LOCAL_CPU_SIZE": "5GB"})
    return "```text\n" + good + "\n\n" + bad + "\n```"


RENDERERS = {
    "config-example": config_example,
    "cli-help": cli_help,
    "settings-table": settings_table,
    "env-table": env_table,
    "lmcache-refused": lmcache_refused,
    "lmcache-ignored": lmcache_ignored,
}


def bench_results(language: str) -> str:
    """The generated benchmark tables of ``language`` (English where plot.py wrote none for it)."""
    from pathlib import Path

    bench = Path(__file__).resolve().parents[1] / "_static" / "bench"
    path = bench / f"results.{language}.md"
    if language in ("en", None) or not path.is_file():
        path = bench / "results.md"
    return f"::::{{container}} notranslate\n{path.read_text(encoding='utf-8')}::::"


def render_markers(text: str, language: str = "en") -> str:
    for marker, render in RENDERERS.items():
        token = f"<!-- kvoffload:{marker} -->"
        if token in text:
            text = text.replace(token, render())
    token = "<!-- kvoffload:bench-results -->"
    if token in text:
        text = text.replace(token, bench_results(language))
    return text


def _source_read(app, docname: str, source: list[str]) -> None:
    rendered = render_markers(source[0], app.config.language)
    if rendered != source[0]:
        # Re-read this page when the code it is generated from changes.
        import kvoffload.cli
        import kvoffload.config

        for module in (kvoffload.config, kvoffload.cli):
            app.env.note_dependency(module.__file__)
        source[0] = rendered


from docutils import nodes  # noqa: E402
from sphinx.transforms import SphinxTransform  # noqa: E402


class KeepDocstringsEnglish(SphinxTransform):
    """Keep text that is not prose out of the translation catalogs.

    - autodoc docstrings: they change with the code, and translating them would tie every source edit
      to the catalogs; the API reference page says that its generated part is in English;
    - paragraphs made only of inline code (the key, type and default cells of the settings table);
    - anything inside a ``notranslate`` container (the generated benchmark results table).

    Runs before Sphinx's ``Locale`` transform (priority 20); ``gettext`` skips nodes marked
    ``translatable=False``.
    """

    default_priority = 15

    def apply(self, **kwargs) -> None:
        for node in self.document.findall(nodes.TextElement):
            if "docstring of " in (node.source or "") or _only_code(node):
                node["translatable"] = False
        for box in self.document.findall(nodes.container):
            if "notranslate" in box["classes"]:
                for node in box.findall(nodes.TextElement):
                    node["translatable"] = False


def _only_code(node: nodes.Element) -> bool:
    """A paragraph made only of inline code (a table cell such as ``chunk_size``): nothing to translate."""
    if not isinstance(node, nodes.paragraph) or not node.children:
        return False
    return all(isinstance(c, nodes.literal) or (isinstance(c, nodes.Text) and not c.strip())
               or (isinstance(c, nodes.raw) and c.astext().strip() in {"<br>", "<br/>"})
               for c in node.children)


def setup(app):
    app.connect("source-read", _source_read)
    app.add_transform(KeepDocstringsEnglish)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
