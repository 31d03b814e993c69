"""``kvoffload cache ls|verify|clear``: look after the persistent tiers without a running engine.

The targets are ``--path DIR`` and/or ``--remote URL``; with neither, the ``local_disk`` and
``remote_url`` of the effective configuration (file, environment), so the command acts on what the
engine uses. The CLI knows no model, so it works on every namespace (model and TP rank) at once.

Exit status: 0 done; 1 bad chunks remain (``verify`` without ``--fix``) or a tier could not be reached;
2 configuration or usage error. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from kvoffload.config import PASSWORD_ENV, ConfigError, load_settings, redact_url
from kvoffload.tiers import disk

if TYPE_CHECKING:
    import redis

# The CLI is not on the inference path: give a busy server time to answer a SCAN page.
_REMOTE_TIMEOUT = 10.0


class _TierError(Exception):
    """A tier could not be used (server down or refusing, directory missing): exit status 1."""


_DESCRIPTION = """\
Targets: --path DIR and/or --remote URL; with neither, local_disk and remote_url of the
configuration (file and environment), i.e. what the engine uses. Every namespace (model, TP rank)
is included.

Exit status: 0 done; 1 bad chunks remain (verify without --fix) or a tier could not be used;
2 configuration or usage error."""


@dataclass(frozen=True)
class _Targets:
    path: str | None
    remote: str | None
    password: str | None


def add_cache_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``cache`` to the main parser's subcommands; each leaf sets ``run(args) -> exit status``."""
    cache = subparsers.add_parser(
        "cache", help="list, verify or clear the stored chunks of the disk and Redis/Valkey tiers",
        description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = cache.add_subparsers(dest="cache_command", metavar="{ls,verify,clear}", required=True)

    path = argparse.ArgumentParser(add_help=False)
    path.add_argument("--path", metavar="DIR", help="disk tier directory (default: local_disk of the configuration)")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--remote", metavar="URL",
                        help=f"Redis/Valkey URL (default: remote_url of the configuration); the password may "
                             f"also come from {PASSWORD_ENV}")

    ls = commands.add_parser("ls", parents=[path, remote], help="chunks and bytes per namespace (model and rank)")
    ls.set_defaults(run=_guarded(_ls))
    verify = commands.add_parser("verify", parents=[path],
                                 help="check every disk chunk's header and checksum; exit 1 if bad ones remain")
    verify.add_argument("--fix", action="store_true", help="remove the bad chunks (they are recomputed when needed)")
    verify.set_defaults(run=_guarded(_verify))
    clear = commands.add_parser("clear", parents=[path, remote], help="remove every stored chunk")
    clear.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    clear.set_defaults(run=_guarded(_clear))


def _guarded(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except ConfigError as exc:
            print(f"kvoffload cache: error: {exc}", file=sys.stderr)
            return 2
        except _TierError as exc:
            print(f"kvoffload cache: error: {exc}", file=sys.stderr)
            return 1
    return run


def _targets(args: argparse.Namespace) -> _Targets:
    path, remote = getattr(args, "path", None), getattr(args, "remote", None)
    if path or remote:
        return _Targets(path, remote, os.environ.get(PASSWORD_ENV) or None)
    settings = load_settings()
    wants_remote = hasattr(args, "remote")
    if settings.local_disk is None and not (wants_remote and settings.remote_url):
        tiers = "--path DIR or --remote URL" if wants_remote else "--path DIR"
        raise ConfigError(f"no persistent tier to act on: pass {tiers}, or set local_disk"
                          f"{' or remote_url' if wants_remote else ''} in the configuration")
    return _Targets(settings.local_disk, settings.remote_url if wants_remote else None, settings.remote_password)


def _require_dir(path: str) -> None:
    if not os.path.isdir(path):
        raise _TierError(f"the disk tier directory {path} does not exist or is not a directory")


@contextmanager
def _remote(url: str, password: str | None) -> Iterator[list[redis.Redis]]:
    """A client for each server of ``url`` (the masters of a cluster); any server failure inside becomes a
    one-line error with the password masked."""
    import redis  # only when a remote tier is asked for: it is an optional dependency

    from kvoffload.tiers.redis_tier import backend, secret_of

    servers = backend(url, password, _REMOTE_TIMEOUT)
    secret = secret_of(url, password)
    try:
        if not servers.start():
            raise _TierError(f"the remote tier {redact_url(url)} failed: no server answered (see the log above)")
        yield [node.client for node in servers.nodes]
    except redis.exceptions.RedisError as exc:
        message = str(exc).replace(secret, "***") if secret else str(exc)
        raise _TierError(f"the remote tier {redact_url(url)} failed: {type(exc).__name__}: {message}") from None
    finally:
        servers.close()


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _table(rows: Iterable[tuple[str, ...]], header: tuple[str, ...]) -> None:
    rows = [header, *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    for row in rows:
        print("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                               enumerate(zip(row, widths))).rstrip())


def _ls(args: argparse.Namespace) -> int:
    targets = _targets(args)
    if targets.path:
        _require_dir(targets.path)
        by_ns: dict[str, list[disk.DiskEntry]] = defaultdict(list)
        for entry in disk.scan(targets.path):
            by_ns[entry.namespace].append(entry)
        print(f"disk {targets.path}")
        rows = [(ns, str(len(es)), _human(sum(e.bytes for e in es)), _stamp(min(e.mtime for e in es)),
                 _stamp(max(e.mtime for e in es))) for ns, es in sorted(by_ns.items())]
        all_entries = [e for es in by_ns.values() for e in es]
        rows.append(("total", str(len(all_entries)), _human(sum(e.bytes for e in all_entries)), "", ""))
        _table(rows, ("namespace", "chunks", "bytes", "oldest", "newest"))
    if targets.remote:
        from kvoffload.tiers.redis_tier import list_keys

        with _remote(targets.remote, targets.password) as clients:
            entries = [entry for client in clients for entry in list_keys(client)]
        counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for entry in entries:
            counts[entry.namespace][0] += 1
            counts[entry.namespace][1] += entry.bytes
        print(f"remote {redact_url(targets.remote)}")
        rows = [(ns, str(n), _human(b)) for ns, (n, b) in sorted(counts.items())]
        rows.append(("total", str(len(entries)), _human(sum(e.bytes for e in entries))))
        _table(rows, ("namespace", "chunks", "bytes"))
    return 0


def _verify(args: argparse.Namespace) -> int:
    targets = _targets(args)
    _require_dir(targets.path)
    report = disk.verify(targets.path, fix=args.fix)
    for path, reason in report.bad:
        print(f"bad: {path}: {reason}")
    remaining = len(report.bad) - report.removed
    print(f"disk {targets.path}: {report.checked} chunks checked, {len(report.bad)} bad, {report.removed} removed")
    if remaining:
        print(f"{remaining} bad chunks remain; run with --fix to remove them", file=sys.stderr)
        return 1
    return 0


def _confirm(what: str) -> bool:
    if not sys.stdin.isatty():
        raise ConfigError(f"refusing to clear {what} without --yes (stdin is not a terminal)")
    return input(f"Remove every stored chunk from {what}? [y/N] ").strip().lower() in {"y", "yes"}


def _clear(args: argparse.Namespace) -> int:
    targets = _targets(args)
    names = [n for n in (targets.path, targets.remote and redact_url(targets.remote)) if n]
    if not args.yes and not _confirm(" and ".join(names)):
        print("nothing removed")
        return 0
    if targets.path:
        _require_dir(targets.path)
        print(f"disk {targets.path}: removed {disk.clear(targets.path)} files")
    if targets.remote:
        from kvoffload.tiers.redis_tier import clear

        with _remote(targets.remote, targets.password) as clients:
            removed = sum(clear(client) for client in clients)
        print(f"remote {redact_url(targets.remote)}: removed {removed} chunks")
    return 0
