"""Settings: one typed record, three sources, strict validation.

Sources, in rising precedence:

1. a YAML file named by ``KVOFFLOAD_CONFIG_FILE`` (or ``LMCACHE_CONFIG_FILE``),
2. ``KVOFFLOAD_<KEY>`` environment variables (``LMCACHE_<KEY>`` are read as aliases),
3. ``kv_connector_extra_config`` of vLLM's ``--kv-transfer-config``.

Every value remembers where it came from, so ``kvoffload config`` can show it. A bad value, a negative
size or an unknown key is a :class:`~kvoffload.errors.ConfigError` naming the key, the value and the accepted form: we
never fall back to a default silently, because a cache that is quietly off looks exactly like a cache
that does not help.
"""

from __future__ import annotations

import difflib
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import parse_qs, urlparse

import yaml

from kvoffload.errors import ConfigError

logger = logging.getLogger(__name__)

ENV_PREFIX = "KVOFFLOAD_"
LMCACHE_ENV_PREFIX = "LMCACHE_"
CONFIG_FILE_ENV = "KVOFFLOAD_CONFIG_FILE"
LMCACHE_CONFIG_FILE_ENV = "LMCACHE_CONFIG_FILE"
PASSWORD_ENV = "KVOFFLOAD_REMOTE_PASSWORD"

#: Shortest secret accepted in ``remote_auth_key_file``: below it, guessing the HMAC key is within reach.
MIN_AUTH_KEY_BYTES = 16

# Environment variables that are not settings but are allowed under our prefixes.
_NON_SETTING_ENV = {CONFIG_FILE_ENV, PASSWORD_ENV, LMCACHE_CONFIG_FILE_ENV}

# LMCache features kvoffload does not have: refused, so nobody believes they are on.
LMCACHE_ONLY_KEYS: dict[str, str] = {
    "use_layerwise": "layer-wise pipelining",
    "enable_blending": "CacheBlend",
    "blend_recompute_ratios": "CacheBlend",
    "blend_special_str": "CacheBlend",
    "enable_p2p": "peer-to-peer KV sharing",
    "enable_pd": "prefill/decode disaggregation",
    "pd_role": "prefill/decode disaggregation",
    "enable_controller": "the LMCache controller",
    "gds_path": "GPUDirect Storage",
    "nixl_role": "NIXL transfers",
    "weka_path": "the WEKA backend",
    "external_lookup_client": "external lookup clients",
    "enable_xpyd": "xPyD disaggregation",
}
# LMCache settings that exist only to select LMCache code paths; accepted and ignored.
LMCACHE_NOOP_KEYS = {"use_experimental", "track_usage", "log_level", "remote_serde", "cache_policy"}


class _Refused(ValueError):
    """A parse failure that says why; the reason is added to the :class:`~kvoffload.errors.ConfigError` (Python's own text never is)."""


#: The host pool may take at most this share of the host's physical memory; the rest is for the operating
#: system and vLLM's own host memory. Checked at load, so ``kvoffload config`` sees what the allocator would.
MAX_HOST_MEMORY_SHARE = 0.9
#: Longest ``remote_timeout`` (and ``socket_timeout`` in ``remote_url``): a remote call that may take longer
#: than an hour is no cache, and much larger numbers overflow the socket layer when the tier starts.
MAX_REMOTE_TIMEOUT = 3600.0
#: Longest ``remote_ttl``: 2**31 - 1 s (68 years). Redis refuses ``SET … PX`` when now + PX milliseconds does
#: not fit in 64 bits (above about 9.2e15 s), which would make every write fail while the tier looks up.
MAX_REMOTE_TTL = 2**31 - 1
#: Redis's and Valkey's default ``databases 16``: database numbers 0 to 15.
REDIS_DATABASES = 16
_REMOTE_SCHEMES = {"redis", "rediss", "valkey", "valkeys"}
_TLS_SCHEMES = {"rediss", "valkeys"}
#: Redis Cluster and Valkey Cluster URLs, by the scheme of each node's own URL.
_CLUSTER_SCHEMES = {"redis+cluster": "redis", "valkey+cluster": "redis", "rediss+cluster": "rediss",
                    "valkeys+cluster": "rediss"}
DEFAULT_REDIS_PORT = 6379
_OFF_WORDS = {"", "0", "false", "no", "off", "none", "null"}


@dataclass(frozen=True)
class _Key:
    name: str
    default: Any
    parse: Callable[[str, Any], Any]
    accepted: str
    help: str


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.strip().lower() in {"0", "false", "no", "off"}:
        return False
    raise ValueError


def _parse_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, str):
        value = value.strip()
    number = int(value)
    if isinstance(value, float) and number != value:
        raise ValueError
    if number <= 0:
        raise ValueError
    return number


def _parse_number(value: Any) -> float:
    """A finite number, from a number or a numeric string; booleans, NaN and infinities are not numbers."""
    if isinstance(value, bool):
        raise ValueError
    number = float(value.strip() if isinstance(value, str) else value)
    if not math.isfinite(number):
        raise ValueError
    return number


def _parse_size_gb(key: str, value: Any) -> float:
    number = _parse_number(value)
    if number < 0:
        raise ValueError
    return number


def host_memory_bytes() -> int:
    """Physical memory of this host (a container's memory limit is not read)."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _parse_cpu_size_gb(key: str, value: Any) -> float:
    number = _parse_number(value)
    if number <= 0:
        raise _Refused("the host pool is also the staging buffer of the disk and remote tiers")
    memory_gb = host_memory_bytes() / 1e9
    if number > MAX_HOST_MEMORY_SHARE * memory_gb:
        raise _Refused(f"this host has {memory_gb:.1f} GB of physical memory, so at most "
                       f"{MAX_HOST_MEMORY_SHARE * memory_gb:.1f} GB")
    return number


def _parse_timeout(key: str, value: Any) -> float:
    number = _parse_number(value)
    if not 0 < number <= MAX_REMOTE_TIMEOUT:
        raise ValueError
    return number


def _parse_ttl(key: str, value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        return None
    number = _parse_number(value)
    if not 0 < number <= MAX_REMOTE_TTL:
        raise ValueError
    return number


def _parse_disk_path(key: str, value: Any) -> str | None:
    if value is None or value is False:
        return None
    if not isinstance(value, str):
        raise ValueError
    value = value.strip()
    if value.lower() in {"", "none", "null", "false"}:
        return None
    if value.startswith("file://"):  # LMCache writes local_disk as a file:// URL
        value = value[len("file://") :]
    if not value:
        raise ValueError
    return str(Path(value).expanduser())


def _db_number(text: str) -> None:
    if not (text.isascii() and text.isdigit()) or int(text) >= REDIS_DATABASES:
        raise ValueError


def _seconds_text(text: str) -> None:
    _parse_timeout("", text)


def _bool_text(text: str) -> None:
    _parse_bool("", text)


def _any_text(text: str) -> None:
    pass


def _cert_reqs(text: str) -> None:
    if text not in {"none", "optional", "required"}:
        raise ValueError


_DB_ACCEPTED = f"0 to {REDIS_DATABASES - 1} (Redis's default `databases {REDIS_DATABASES}`)"
_SECONDS_ACCEPTED = f"a number of seconds > 0 and <= {MAX_REMOTE_TIMEOUT:g}"
#: ``remote_url`` query options as redis-py reads them: check, accepted form. Others are refused: redis-py
#: passes them on as client arguments it may not know, or turns on retries that multiply the timeout.
_URL_OPTIONS: dict[str, tuple[Callable[[str], None], str]] = {
    "db": (_db_number, _DB_ACCEPTED),
    "socket_timeout": (_seconds_text, _SECONDS_ACCEPTED),
    "socket_connect_timeout": (_seconds_text, _SECONDS_ACCEPTED),
    "socket_keepalive": (_bool_text, "true or false"),
}
#: A cluster has database 0 only, so no ``db``.
_CLUSTER_URL_OPTIONS = {name: option for name, option in _URL_OPTIONS.items() if name != "db"}
#: Options of the TLS client only (rediss://, valkeys://).
_TLS_URL_OPTIONS: dict[str, tuple[Callable[[str], None], str]] = {
    "ssl_cert_reqs": (_cert_reqs, "none, optional or required"),
    "ssl_ca_certs": (_any_text, "a file path"),
    "ssl_check_hostname": (_bool_text, "true or false"),
}


def _check_query(scheme: str, query: str, known: dict[str, tuple[Callable[[str], None], str]]) -> None:
    """The query options of a ``remote_url``, checked as redis-py will read them; ``known`` are those allowed."""
    tls_scheme = scheme in _TLS_SCHEMES or _CLUSTER_SCHEMES.get(scheme) == "rediss"
    if tls_scheme:
        known = {**known, **_TLS_URL_OPTIONS}
    for name, texts in parse_qs(query).items():  # as redis-py: the first value; blank values dropped
        if name not in known:
            with_tls = "rediss+cluster://" if scheme in _CLUSTER_SCHEMES else "rediss://"
            tls = "" if tls_scheme else f"; with {with_tls} also {', '.join(_TLS_URL_OPTIONS)}"
            raise _Refused(f"unknown query option {name!r}: known are {', '.join(known)}{tls}")
        check, accepted = known[name]
        try:
            check(texts[0])
        except ValueError:
            raise _Refused(f"query option {name}={texts[0]!r}: expected {accepted}") from None


def _check_url(scheme: str, path: str, query: str) -> None:
    """The database and query options of a one-server ``remote_url``."""
    if path not in {"", "/"}:
        try:
            _db_number(path[1:])
        except ValueError:
            raise _Refused(f"database {path[1:]!r}: expected {_DB_ACCEPTED}") from None
    _check_query(scheme, query, _URL_OPTIONS)


@dataclass(frozen=True)
class ClusterURL:
    """A ``redis+cluster://`` URL taken apart: the seed nodes, and what each node's own URL shares."""

    scheme: str  #: ``redis`` or ``rediss``: the scheme of a node's own URL
    nodes: tuple[tuple[str, int], ...]  #: the seed nodes as (host, port)
    userinfo: str  #: ``user:password`` (either part may be empty) or "", as written
    query: str

    def node_url(self, host: str, port: int) -> str:
        """The one-server URL of a node, with this URL's credentials and options (database 0)."""
        at = f"{self.userinfo}@" if self.userinfo else ""
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{at}{host}:{port}/0" + (f"?{self.query}" if self.query else "")


def is_cluster_url(url: str) -> bool:
    return urlparse(url).scheme in _CLUSTER_SCHEMES


def _split_cluster_url(url: str) -> ClusterURL:
    """``url`` taken apart; _Refused says what is wrong (no nodes, a bad port, a database but 0, an option)."""
    parsed = urlparse(url)
    userinfo, _, hosts = parsed.netloc.rpartition("@")
    if not hosts.strip():
        raise _Refused("no nodes: expected one or more host:port, comma-separated")
    nodes = []
    for part in hosts.split(","):
        node = urlparse(f"//{part.strip()}")
        if not node.hostname:
            raise _Refused(f"node {part!r} has no host: expected host:port, comma-separated")
        try:
            port = node.port
        except ValueError:
            port = 0
        if port == 0:
            raise _Refused(f"node {part!r}: the port is not a number from 1 to 65535")
        nodes.append((node.hostname, port or DEFAULT_REDIS_PORT))
    if parsed.path not in {"", "/", "/0"}:
        raise _Refused(f"database {parsed.path[1:]!r}: a cluster has database 0 only")
    _check_query(parsed.scheme, parsed.query, _CLUSTER_URL_OPTIONS)
    return ClusterURL(_CLUSTER_SCHEMES[parsed.scheme], tuple(nodes), userinfo, parsed.query)


def cluster_url(url: str) -> ClusterURL:
    """``url`` (a ``redis+cluster://`` URL) taken apart, or a ConfigError naming ``remote_url``."""
    try:
        return _split_cluster_url(url)
    except _Refused as exc:
        raise ConfigError(f"remote_url {_shown('remote_url', url)!r}: {exc}") from None


def _parse_remote_url(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError
    value = value.strip()
    if value.lower() in {"", "none", "null"}:
        return None
    parsed = urlparse(value)
    if parsed.scheme in _CLUSTER_SCHEMES:
        _split_cluster_url(value)
        return value
    if parsed.scheme not in _REMOTE_SCHEMES or not parsed.hostname:
        raise ValueError
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError from None
    _check_url(parsed.scheme, parsed.path, parsed.query)
    return value


def _parse_optional_path(key: str, value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none", "null"}):
        return None
    if not isinstance(value, str):
        raise ValueError
    return str(Path(value.strip()).expanduser())


def _parse_copy_backend(key: str, value: Any) -> str:
    if not isinstance(value, str) or value.strip().lower() not in {"auto", "cuda", "torch"}:
        raise ValueError
    return value.strip().lower()


KEYS: dict[str, _Key] = {
    k.name: k
    for k in [
        _Key("chunk_size", 256, _parse_positive_int, "a positive integer (tokens), a multiple of vLLM's KV block size",
             "Tokens per stored chunk: the unit of lookup, storage and eviction."),
        _Key("local_cpu", True, _parse_bool, "true or false",
             "Keep chunks in the host pool as a cache; false keeps the pool only as the staging buffer of slower tiers."),
        _Key("max_local_cpu_size", 5.0, _parse_cpu_size_gb,
             f"a number of GB > 0 and at most {MAX_HOST_MEMORY_SHARE:.0%} of the host's physical memory",
             "Size of the host memory pool in GB (10^9 bytes) for the whole engine, split evenly over tensor-parallel ranks; pinned when CUDA is present."),
        _Key("local_disk", None, _parse_disk_path, "a directory path (or file:// URL), or null",
             "Directory of the persistent disk tier; unset means no disk tier."),
        _Key("max_local_disk_size", 0.0, _parse_size_gb, "a number of GB >= 0 (> 0 when local_disk is set)",
             "Byte limit of the disk tier in GB; least recently used chunks are removed above it."),
        _Key("remote_url", None, _parse_remote_url,
             f"redis://[:password@]host:port/db with db 0 to {REDIS_DATABASES - 1}, rediss://… (TLS), "
             "redis+cluster://[:password@]host:port,host:port/ (a cluster, db 0), or null",
             "Redis or Valkey server, or Redis/Valkey Cluster, shared by several engines; unset means no remote tier."),
        _Key("remote_timeout", 0.5, _parse_timeout, _SECONDS_ACCEPTED,
             "Longest time any remote operation may take before the request falls back to recompute."),
        _Key("remote_ttl", None, _parse_ttl, f"a number of seconds > 0 and <= {MAX_REMOTE_TTL} (2**31 - 1), or null for no expiry",
             "Expiry of chunks written to the remote tier."),
        _Key("remote_auth_key_file", None, _parse_optional_path,
             f"a file path (at least {MIN_AUTH_KEY_BYTES} bytes of secret), or null",
             "Secret shared by the engines that use remote_url: they sign their entries with HMAC-SHA256 and "
             "treat any entry without a valid signature as a miss; unset means entries are trusted."),
        _Key("save_decode_cache", False, _parse_bool, "true or false",
             "Also store chunks made of generated tokens, not only the prompt."),
        _Key("copy_backend", "auto", _parse_copy_backend, "auto, cuda or torch",
             "GPU copy path: the CUDA extension, the portable torch path, or auto (CUDA when it loads)."),
    ]
}


@dataclass(frozen=True)
class Settings:
    """The effective configuration. Build it with :func:`load_settings`."""

    chunk_size: int = 256
    local_cpu: bool = True
    max_local_cpu_size: float = 5.0
    local_disk: str | None = None
    max_local_disk_size: float = 0.0
    remote_url: str | None = None
    remote_timeout: float = 0.5
    remote_ttl: float | None = None
    remote_auth_key_file: str | None = None
    save_decode_cache: bool = False
    copy_backend: str = "auto"
    #: where each value came from: "default", "file:<path>", "env:<NAME>" or "kv_connector_extra_config"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)
    #: ``KVOFFLOAD_REMOTE_PASSWORD`` as read at load time; never printed
    password_env: str | None = field(default=None, compare=False, repr=False)

    @property
    def cpu_pool_bytes(self) -> int:
        return int(self.max_local_cpu_size * 1e9)

    @property
    def disk_bytes(self) -> int:
        return int(self.max_local_disk_size * 1e9)

    @property
    def remote_password(self) -> str | None:
        """Password for the remote tier: ``KVOFFLOAD_REMOTE_PASSWORD`` wins over the URL's. Never logged."""
        return self.password_env or (urlparse(self.remote_url).password if self.remote_url else None)

    def remote_auth_key(self) -> bytes | None:
        """The secret in ``remote_auth_key_file``, read on each call and never kept in the settings, so
        no printout of them can show it; surrounding whitespace (a trailing newline) is not part of it."""
        if self.remote_auth_key_file is None:
            return None
        source = self.sources.get("remote_auth_key_file", "default")
        where = f"remote_auth_key_file {self.remote_auth_key_file!r} (from {source})"
        try:
            secret = Path(self.remote_auth_key_file).read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read {where}: {exc.strerror}") from None
        if len(secret) < MIN_AUTH_KEY_BYTES:
            raise ConfigError(f"{where} holds {len(secret)} bytes: expected at least {MIN_AUTH_KEY_BYTES} bytes of "
                              f"secret, e.g. written by `openssl rand -hex 32`")
        return secret

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name in KEYS}

    def redacted(self) -> dict[str, Any]:
        """The settings with any password in ``remote_url`` masked, for logs and the CLI."""
        values = self.as_dict()
        if self.remote_url:
            values["remote_url"] = redact_url(self.remote_url)
        return values


def redact_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password is None:
        return url
    netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@", 1)
    return parsed._replace(netloc=netloc).geturl()


def _unknown_key_error(key: str, source: str, name: str | None = None) -> ConfigError:
    lowered = name or key.lower()
    if lowered in LMCACHE_ONLY_KEYS:
        return ConfigError(
            f"{key!r} (from {source}) turns on {LMCACHE_ONLY_KEYS[lowered]}, an LMCache feature that kvoffload "
            f"does not have; remove the key"
        )
    hint = difflib.get_close_matches(lowered, KEYS, n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    return ConfigError(f"unknown setting {key!r} (from {source}){did_you_mean} Known settings: {', '.join(KEYS)}")


def _lmcache_feature_off(key: str, name: str, value: Any, source: str) -> bool:
    """True for an LMCache-only key whose value leaves its feature off: nothing to refuse, kvoffload lacks it anyway."""
    if name not in LMCACHE_ONLY_KEYS:
        return False
    off = (value is None or (isinstance(value, (int, float)) and value == 0)  # False and 0 (booleans are ints)
           or (isinstance(value, str) and value.strip().lower() in _OFF_WORDS))
    if not off:
        return False
    logger.info("kvoffload: %s=%r (from %s) leaves %s off; kvoffload does not have it", key, value, source,
                LMCACHE_ONLY_KEYS[name])
    return True


def _shown(key: str, value: Any) -> Any:
    """The value as an error message may show it: a password in ``remote_url`` is masked."""
    if key != "remote_url" or not isinstance(value, str):
        return value
    try:
        return redact_url(value)
    except ValueError:  # not even a URL, e.g. an unclosed IPv6 bracket: it may hold anything
        return "<not a URL>"


def _parse_value(key: str, value: Any, source: str) -> Any:
    spec = KEYS[key]
    try:
        return spec.parse(key, value)
    except _Refused as exc:
        raise ConfigError(
            f"invalid value {_shown(key, value)!r} for {key!r} (from {source}): expected {spec.accepted}; {exc}"
        ) from None
    except (ValueError, TypeError, OverflowError):
        raise ConfigError(
            f"invalid value {_shown(key, value)!r} for {key!r} (from {source}): expected {spec.accepted}"
        ) from None


def _read_yaml(path_str: str, env_name: str) -> dict[str, Any]:
    path = Path(path_str).expanduser()
    source = f"{env_name}={path_str}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path} named by {source}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"the config file {path} (from {source}) is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"the config file {path} (from {source}) must hold a mapping of settings, got {type(data).__name__}")
    return data


def _collect(raw: Mapping[str, Any], source: str, values: dict[str, Any], sources: dict[str, str],
             lmcache: bool) -> None:
    for key, value in raw.items():
        name = str(key).lower()
        if name.startswith("kvoffload."):
            name = name[len("kvoffload."):]
        if (lmcache and name in LMCACHE_NOOP_KEYS) or _lmcache_feature_off(str(key), name, value, source):
            continue
        if name not in KEYS:
            raise _unknown_key_error(str(key), source, name)
        values[name] = _parse_value(name, value, source)
        sources[name] = source


def load_settings(
    extra_config: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build the effective :class:`Settings` from the file, the environment and ``extra_config``."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {name: "default" for name in KEYS}
    used_lmcache: list[str] = []

    for env_name, lmcache in ((LMCACHE_CONFIG_FILE_ENV, True), (CONFIG_FILE_ENV, False)):
        if env.get(env_name):
            data = _read_yaml(env[env_name], env_name)
            _collect(data, f"file:{env[env_name]}", values, sources, lmcache)
            if lmcache:
                used_lmcache.append(env_name)

    # LMCACHE_* first so that a KVOFFLOAD_* variable for the same key wins.
    for prefix, lmcache in ((LMCACHE_ENV_PREFIX, True), (ENV_PREFIX, False)):
        for env_name in sorted(env):
            if not env_name.startswith(prefix) or env_name in _NON_SETTING_ENV:
                continue
            name = env_name[len(prefix):].lower()
            if lmcache and name in LMCACHE_NOOP_KEYS:
                used_lmcache.append(env_name)
                continue
            if _lmcache_feature_off(env_name, name, env[env_name], f"environment variable {env_name}"):
                continue
            if name not in KEYS:
                if lmcache and name not in LMCACHE_ONLY_KEYS:
                    # Other LMCACHE_* variables belong to LMCache itself (it may be installed too).
                    continue
                raise _unknown_key_error(env_name, f"environment variable {env_name}", name)
            values[name] = _parse_value(name, env[env_name], f"env:{env_name}")
            sources[name] = f"env:{env_name}"
            if lmcache:
                used_lmcache.append(env_name)

    if extra_config is not None and not isinstance(extra_config, Mapping):
        raise ConfigError(f"kv_connector_extra_config must be a mapping of settings (a JSON object), got "
                          f"{type(extra_config).__name__} {extra_config!r}")
    if extra_config:
        _collect(extra_config, "kv_connector_extra_config", values, sources, lmcache=False)

    if used_lmcache:
        logger.info("kvoffload: reading LMCache settings %s as kvoffload settings", ", ".join(sorted(set(used_lmcache))))

    for name in [n for n in KEYS if n not in values]:  # defaults pass the same checks: 5 GB fits not every host
        values[name] = _parse_value(name, KEYS[name].default, "default")
    settings = Settings(**values, sources=sources, password_env=env.get(PASSWORD_ENV) or None)
    _check_consistency(settings)
    return settings


def _check_consistency(s: Settings) -> None:
    if s.local_disk is not None and s.max_local_disk_size <= 0:
        raise ConfigError(
            f"local_disk is set to {s.local_disk!r} (from {s.sources['local_disk']}) but max_local_disk_size is "
            f"{s.max_local_disk_size} (from {s.sources['max_local_disk_size']}): expected a number of GB > 0"
        )
    if not s.local_cpu and s.local_disk is None and s.remote_url is None:
        raise ConfigError(
            "local_cpu is false and neither local_disk nor remote_url is set: kvoffload would store nothing; "
            "enable at least one tier"
        )
