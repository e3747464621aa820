"""remex configuration: one frozen dataclass from ``remex.toml`` and ``REMEX_*``.

Where settings come from, later ones winning:

1. the embedded stack ``remex up`` recorded, when one is up (there are no
   other defaults: without a stack or a configured broker and execution
   server, commands that need them refuse with :data:`NO_STACK`; a
   well-known port on a shared host may be somebody else's Redis);
2. the user's ``$XDG_CONFIG_HOME/remex/remex.toml`` (``~/.config/remex/remex.toml``);
3. ``remex.toml`` in the project folder;
4. ``REMEX_*`` environment variables.

``remex.toml``::

    [broker]
    url = "redis://:password@127.0.0.1:6379/0"   # Celery broker and result backend
    result-backend = ""                          # default: the broker URL
    server-ca = ""              # PEM files, for rediss:// (TLS) URLs
    client-cert = ""
    client-key = ""

    [remote.execution]          # CAS + ActionCache + Execution
    url = "grpc://127.0.0.1:50051"
    instance-name = ""
    server-ca = ""              # PEM files, for grpcs:// / https://
    client-cert = ""
    client-key = ""
    token-file = ""             # bearer token, re-read when it changes
    request-timeout = 60        # seconds one attempt of an RPC may take
    retry-limit = 9             # retries of a transient failure (0: none)
    retry-delay = 100           # milliseconds before the first retry (then doubling)
    keepalive-time = 30         # seconds between keepalive pings (0: none)

    [remote.storage]            # the execution side's CAS; default: the execution server
    [remote.action-cache]       # its ActionCache; default: the execution server

    [remote.artifacts]          # CAS + Remote Asset; default: the execution server
    url = "grpc://127.0.0.1:50052"

    [cas]
    dir = "~/.cache/remex/cas"  # this host's local CAS
    quota = "10G"
    download = "minimal"        # or "all": what workers bring home (build without the bytes)

    [worker]
    concurrency = 4
    fetch-concurrency = 4       # source downloads at once (a pool of their own)
    nice = 0                    # CPU priority, 0-19 (remex up's workers: 10, below casd's)
    staging = 0                 # elements staged at once, up to their Execute; 0: no limit
                                # (remex up's workers: 2, as their actions run on this host)
    heartbeat-timeout = 30      # seconds; a silent running element is then checked
    reconcile-interval = 5      # seconds between reconciler passes

    [fetch]                     # how workers download network sources
    connect-timeout = 10        # seconds to wait for a connection
    read-timeout = 60           # seconds to wait for the next bytes
    retries = 3                 # more attempts per URL on connection errors and 5xx
    backoff = 1                 # seconds before the first retry (doubled, jittered)
    ca-bundle = ""              # PEM CA bundle for https (default: the system's)
    default-mirror = ""         # project.conf mirror to try first (bst's default-mirror)

    [bot]                       # remex bot (BuildGrid's execution workers)
    local-cas = true            # a buildbox-casd proxying the server's CAS in front of buildbox-run
    cas-dir = ""                # its folder (default: the bot's workdir/casd)
    cas-quota = "10G"           # its LRU quota

    [build]
    on-error = "continue"       # or "quit", "terminate": what a failed element does
                                # to the rest of its build (as bst's --on-error)

    [projects.NAME.options]     # option values of the project named NAME
    debug = true                # (BuildStream's ``projects: NAME: options:``);
    flags = ["a", "b"]          # ``-o NAME VALUE`` on the command line wins

Environment variables: ``REMEX_BROKER_URL``, ``REMEX_RESULT_BACKEND``,
``REMEX_BROKER_{SERVER_CA,CLIENT_CERT,CLIENT_KEY}``,
``REMEX_{EXECUTION,STORAGE,ACTION_CACHE,ARTIFACTS}_{URL,INSTANCE_NAME,SERVER_CA,CLIENT_CERT,
CLIENT_KEY,TOKEN_FILE,REQUEST_TIMEOUT,RETRY_LIMIT,RETRY_DELAY,KEEPALIVE_TIME}``,
``REMEX_CAS_DIR``, ``REMEX_CAS_QUOTA``, ``REMEX_CAS_DOWNLOAD``, ``REMEX_WORKER_CONCURRENCY``,
``REMEX_WORKER_FETCH_CONCURRENCY``,
``REMEX_HEARTBEAT_TIMEOUT``, ``REMEX_RECONCILE_INTERVAL``, ``REMEX_BUILD_ON_ERROR``,
``REMEX_FETCH_{CONNECT_TIMEOUT,READ_TIMEOUT,RETRIES,BACKOFF,CA_BUNDLE,DEFAULT_MIRROR}``,
``REMEX_BOT_LOCAL_CAS`` (``true``/``false``), ``REMEX_BOT_CAS_DIR``, ``REMEX_BOT_CAS_QUOTA``,
``REMEX_CONFIG`` (an explicit config file, read instead of the user's).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pipeline.errors import ConfigError
from pipeline.reapi.channel import Endpoint

if TYPE_CHECKING:
    # (Not at run time: importing pipeline.elements loads the whole loader,
    # a tenth of a second every command that reads the configuration pays.)
    from pipeline.elements.sources.base import NetworkSettings

#: ``[build] on-error`` values (pipeline.scheduler.ON_ERROR_MODES): after an
#: element fails, ``continue`` builds what does not depend on it, ``quit``
#: starts nothing new, ``terminate`` also cancels what is running.
ON_ERROR_MODES = ("continue", "quit", "terminate")

#: ``[cas] download`` values (the same as pipeline.stages.context.DOWNLOAD_MODES).
DOWNLOAD_MODES = ("minimal", "all")

#: ``[bot] cas-quota`` when not set: the LRU quota of a bot host's casd.
DEFAULT_BOT_CAS_QUOTA = 10 * 1024**3

CONFIG_FILE_NAME = "remex.toml"
NO_STACK = "no remex stack is up here; run 'remex up' or set {key}"
"""The refusal when neither a stack nor the setting is there (``{key}``: which setting)."""

_REMOTE_KEYS = {
    "url": "url",
    "instance-name": "instance_name",
    "server-ca": "server_ca",
    "client-cert": "client_cert",
    "client-key": "client_key",
    "token-file": "token_file",
}
# BuildStream's ``connection-config`` keys, allowed in every [remote.KEY]
# table: the ConnectionSettings attribute each sets and how its value is read.
_CONNECTION_KEYS = {
    "request-timeout": "request_timeout",
    "retry-limit": "retry_limit",
    "retry-delay": "retry_delay",
    "keepalive-time": "keepalive_time",
}
# [remote.KEY] tables and the RemexConfig attribute each sets.
_REMOTES = {
    "execution": "execution",
    "storage": "storage",
    "action-cache": "action_cache",
    "artifacts": "artifacts",
}
# [broker] TLS keys, the RemexConfig attribute each sets, and the query
# parameter of a rediss:// URL that carries it (read alike by redis-py,
# kombu and Celery's Redis result backend).
_BROKER_TLS = {
    "server-ca": ("broker_server_ca", "ssl_ca_certs"),
    "client-cert": ("broker_client_cert", "ssl_certfile"),
    "client-key": ("broker_client_key", "ssl_keyfile"),
}
# [fetch] keys: the FetchConfig attribute, and how a value is read.
_FETCH_KEYS = {
    "connect-timeout": "connect_timeout",
    "read-timeout": "read_timeout",
    "retries": "retries",
    "backoff": "backoff",
    "ca-bundle": "ca_bundle",
    "default-mirror": "default_mirror",
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class OptionSetting:
    """One project option's value from a ``remex.toml``, and where it was written."""

    value: Any
    """As TOML gave it: a string, a boolean, a number or a list."""
    file: str
    line: int
    """1-based; the table's line when the key's own line cannot be found."""


@dataclass(frozen=True)
class FetchConfig:
    """``[fetch]``: how network sources are downloaded (see :func:`network_settings`)."""

    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    retries: int = 3
    """Attempts per URL after the first, on connection errors, timeouts and 5xx."""
    backoff: float = 1.0
    """Seconds before the first retry; doubled each time, with jitter."""
    ca_bundle: Path | None = None
    default_mirror: str | None = None
    """The project.conf mirror whose URLs are tried first (BuildStream's default-mirror)."""


@dataclass(frozen=True)
class RemexConfig:
    """Everything remex needs to know about where things are."""

    broker_url: str = ""
    """Empty when neither configured nor given by a stack (see :meth:`require_broker`)."""
    result_backend: str = ""
    broker_server_ca: Path | None = None
    """CA bundle (PEM) to verify a ``rediss://`` broker with (default: the system's)."""
    broker_client_cert: Path | None = None
    """Client certificate (PEM) for a ``rediss://`` broker that asks for one."""
    broker_client_key: Path | None = None
    execution: Endpoint = field(default_factory=lambda: Endpoint(""))
    """Its URL is empty when neither configured nor given by a stack."""
    storage: Endpoint | None = None
    action_cache: Endpoint | None = None
    artifacts: Endpoint | None = None
    cas_dir: Path = field(default_factory=lambda: _cache_home() / "remex" / "cas")
    cas_quota_bytes: int | None = None
    cas_download: str = "minimal"
    """``minimal``: workers fetch Directory messages and logs, not file blobs;
    ``all``: every dependency tree and output comes whole into the local CAS."""
    worker_concurrency: int = 4
    fetch_concurrency: int = 4
    """Source downloads at once per worker host (``[worker] fetch-concurrency``):
    a pool of its own on the ``remex.fetch`` queue, so downloads never hold build slots."""
    worker_nice: int | None = None
    """``[worker] nice``: the workers' CPU priority, 0-19 (see
    :func:`pipeline.servers.process.lower_cpu_priority`). None: 0 for
    ``remex worker``; an embedded stack gives its workers
    :data:`pipeline.servers.stack.STACK_WORKER_NICE`, as the actions run on
    the same host."""
    worker_staging: int | None = None
    """``[worker] staging``: how many elements each worker process stages at
    once, from ``stage_to_cas`` until its Execute call (see
    :class:`tasks.runtime.StagingWindow`); 0: no limit. None: 0 for
    ``remex worker``; an embedded stack gives its workers
    :data:`pipeline.servers.stack.STACK_WORKER_STAGING`."""
    heartbeat_timeout: float = 30.0
    reconcile_interval: float = 5.0
    bot_local_cas: bool = True
    """``remex bot`` runs a buildbox-casd proxying the server's CAS (see bot.localcas)."""
    bot_cas_dir: Path | None = None
    """That casd's folder; None: the bot's workdir/casd."""
    bot_cas_quota_bytes: int = DEFAULT_BOT_CAS_QUOTA
    on_error: str = "continue"
    """``[build] on-error``: a build's default on-error mode (:data:`ON_ERROR_MODES`)."""
    project_options: Mapping[str, Mapping[str, OptionSetting]] = field(default_factory=dict)
    """Project name -> option name -> its value from ``[projects.NAME.options]``."""
    fetch: FetchConfig = field(default_factory=FetchConfig)
    """``[fetch]``: timeouts, retries, TLS and the default mirror of source downloads."""
    sources: tuple[str, ...] = ()
    """The files and variables this config was read from, for ``remex config``."""

    @property
    def backend_url(self) -> str:
        """The result backend's URL (a ``rediss://`` one with its TLS files)."""
        return self._with_tls(self.result_backend or self.broker_url)

    @property
    def artifact_endpoint(self) -> Endpoint:
        return self.artifacts or self.execution

    def require_broker(self) -> str:
        """The broker URL.

        Raises:
            ConfigError: none is configured and no stack is up.
        """
        if not self.broker_url:
            raise ConfigError(NO_STACK.format(key="broker.url"))
        return self._with_tls(self.broker_url)

    def _with_tls(self, url: str) -> str:
        """A ``rediss://`` URL with the TLS settings as query parameters
        (``ssl_cert_reqs=required``, ``ssl_ca_certs``, ``ssl_certfile``,
        ``ssl_keyfile``), which redis-py (the scheduler), kombu (Celery's
        broker) and Celery's Redis result backend all read from the URL, so
        every client verifies the server the same way. Parameters already in
        the URL win. Other URLs are returned unchanged."""
        parts = urlsplit(url)
        if parts.scheme != "rediss":
            return url
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        # Certificates are verified unless the URL itself says otherwise
        # (Celery refuses a rediss:// URL that does not say).
        query.setdefault("ssl_cert_reqs", "required")
        for attr, param in _BROKER_TLS.values():
            value = getattr(self, attr)
            if value is not None:
                query.setdefault(param, str(value))
        return urlunsplit(parts._replace(query=urlencode(query)))

    def require_execution(self) -> Endpoint:
        """The execution server.

        Raises:
            ConfigError: none is configured and no stack is up.
        """
        if not self.execution.url:
            raise ConfigError(NO_STACK.format(key="remote.execution.url"))
        return self.execution


def network_settings(config: RemexConfig) -> NetworkSettings:
    """How this host downloads sources, from ``config``'s ``[fetch]`` section."""
    from pipeline.elements.sources.base import NetworkSettings

    fetch = config.fetch
    return NetworkSettings(
        connect_timeout=fetch.connect_timeout,
        read_timeout=fetch.read_timeout,
        retries=fetch.retries,
        backoff=fetch.backoff,
        ca_bundle=fetch.ca_bundle,
    )


def load_config(
    project_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> RemexConfig:
    """Read the configuration (see the module docstring for the order).

    Raises:
        ConfigError: a file is not valid TOML, or a key or value is wrong
            (the message names the file and the key).
    """
    env = os.environ if environ is None else environ
    config = _apply_stack(RemexConfig(), env)
    files: list[Path] = []
    if env.get("REMEX_CONFIG"):
        files.append(Path(env["REMEX_CONFIG"]).expanduser())
    else:
        user_file = _config_home(env) / "remex" / CONFIG_FILE_NAME
        if user_file.is_file():
            files.append(user_file)
    if project_dir is not None and (project_dir / CONFIG_FILE_NAME).is_file():
        files.append(project_dir / CONFIG_FILE_NAME)
    for path in files:
        config = _apply_file(config, path)
    config = _apply_env(config, env)
    _check_broker_tls(config)
    return config


def parse_size(text: str | int, *, where: str) -> int:
    """``"10G"``, ``"512M"``, ``"1.5GiB"`` or a number of bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ConfigError(f"{where}: not a size: {text!r} (use e.g. 512M, 10G)")
    number, unit = match.groups()
    scale = 1024 ** ("KMGT".index(unit.upper()) + 1) if unit else 1
    return int(float(number) * scale)


def _cache_home() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")


def _config_home(env: Mapping[str, str]) -> Path:
    return Path(env.get("XDG_CONFIG_HOME") or Path.home() / ".config")


def _apply_stack(config: RemexConfig, env: Mapping[str, str]) -> RemexConfig:
    """Defaults from the embedded stack ``remex up`` recorded, if one is up."""
    from pipeline.stack import read_stack, stack_broker_url, stack_dir

    folder = stack_dir(dict(env))
    state = read_stack(folder)
    if state is None:
        return config
    return replace(
        config,
        # With the password, read from the file stack.json names (mode 0600).
        broker_url=stack_broker_url(state),
        execution=Endpoint(state["casd"]["url"]),
        sources=(*config.sources, f"embedded stack {folder}"),
    )


def _check_broker_tls(config: RemexConfig) -> None:
    """TLS files only with a ``rediss://`` broker, a client certificate with
    its key, and every file there.

    Raises:
        ConfigError: naming the setting (``broker.KEY`` / ``REMEX_BROKER_KEY``).
    """
    given = {
        key: getattr(config, attr)
        for key, (attr, _) in _BROKER_TLS.items()
        if getattr(config, attr) is not None
    }
    if not given:
        return
    names = ", ".join(f"broker.{key} ({_broker_tls_env(key)})" for key in given)
    urls = [config.broker_url, config.result_backend]
    if not any(urlsplit(url).scheme == "rediss" for url in urls if url):
        raise ConfigError(
            f"{names} given, but the broker URL is not a rediss:// (TLS) URL: "
            f"{urlsplit(config.broker_url).scheme or 'none'}://"
        )
    if ("client-cert" in given) != ("client-key" in given):
        raise ConfigError(
            "broker.client-cert and broker.client-key (REMEX_BROKER_CLIENT_CERT, "
            "REMEX_BROKER_CLIENT_KEY) go together: set both"
        )
    for key, path in given.items():
        if not Path(path).is_file():
            raise ConfigError(f"broker.{key} ({_broker_tls_env(key)}): no such file: {path}")


def _broker_tls_env(key: str) -> str:
    """The environment variable of ``[broker]`` TLS key ``key``."""
    return "REMEX_BROKER_" + key.upper().replace("-", "_")


def _apply_file(config: RemexConfig, path: Path) -> RemexConfig:
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read configuration: {exc}") from exc
    where = str(path)
    _known(
        data, {"broker", "remote", "cas", "worker", "fetch", "bot", "build", "projects"}, where, ""
    )
    changes: dict[str, Any] = {}
    broker = _table(data, "broker", where)
    _known(broker, {"url", "result-backend", *_BROKER_TLS}, where, "broker.")
    if "url" in broker:
        changes["broker_url"] = _str(broker["url"], where, "broker.url")
    if "result-backend" in broker:
        changes["result_backend"] = _str(broker["result-backend"], where, "broker.result-backend")
    for key, (attr, _) in _BROKER_TLS.items():
        if key in broker:
            value = _str(broker[key], where, f"broker.{key}")
            changes[attr] = _path(value, path.parent, where, f"broker.{key}") if value else None
    remote = _table(data, "remote", where)
    _known(remote, set(_REMOTES), where, "remote.")
    base = path.parent
    text = path.read_text()
    for key, attr in _REMOTES.items():
        if key in remote:
            start = getattr(config, attr) or Endpoint("")
            changes[attr] = _endpoint(
                start, _table(remote, key, where), where, f"remote.{key}", base, text=text
            )
    cas = _table(data, "cas", where)
    _known(cas, {"dir", "quota", "download"}, where, "cas.")
    if "dir" in cas:
        changes["cas_dir"] = _path(cas["dir"], base, where, "cas.dir")
    if "quota" in cas:
        changes["cas_quota_bytes"] = parse_size(cas["quota"], where=f"{where}: cas.quota")
    if "download" in cas:
        changes["cas_download"] = _download(
            _str(cas["download"], where, "cas.download"), f"{where}: cas.download"
        )
    worker = _table(data, "worker", where)
    _known(
        worker,
        {
            "concurrency",
            "fetch-concurrency",
            "nice",
            "staging",
            "heartbeat-timeout",
            "reconcile-interval",
        },
        where,
        "worker.",
    )
    if "concurrency" in worker:
        changes["worker_concurrency"] = _positive(
            worker["concurrency"], f"{where}: worker.concurrency"
        )
    if "fetch-concurrency" in worker:
        changes["fetch_concurrency"] = _positive(
            worker["fetch-concurrency"], f"{where}: worker.fetch-concurrency"
        )
    if "nice" in worker:
        changes["worker_nice"] = _nice(worker["nice"], f"{where}: worker.nice")
    if "staging" in worker:
        changes["worker_staging"] = _count(worker["staging"], f"{where}: worker.staging")
    for key, attr in (
        ("heartbeat-timeout", "heartbeat_timeout"),
        ("reconcile-interval", "reconcile_interval"),
    ):
        if key in worker:
            changes[attr] = _seconds(worker[key], f"{where}: worker.{key}")
    if "fetch" in data:
        changes["fetch"] = _fetch(config.fetch, _table(data, "fetch", where), where, path.parent)
    bot = _table(data, "bot", where)
    _known(bot, {"local-cas", "cas-dir", "cas-quota"}, where, "bot.")
    if "local-cas" in bot:
        if not isinstance(bot["local-cas"], bool):
            raise ConfigError(f"{where}: bot.local-cas must be true or false")
        changes["bot_local_cas"] = bot["local-cas"]
    if "cas-dir" in bot:
        changes["bot_cas_dir"] = _path(bot["cas-dir"], base, where, "bot.cas-dir")
    if "cas-quota" in bot:
        changes["bot_cas_quota_bytes"] = parse_size(
            bot["cas-quota"], where=f"{where}: bot.cas-quota"
        )
    build = _table(data, "build", where)
    _known(build, {"on-error"}, where, "build.")
    if "on-error" in build:
        changes["on_error"] = check_on_error(
            _str(build["on-error"], where, "build.on-error"), f"{where}: build.on-error"
        )
    projects = _table(data, "projects", where)
    if projects:
        changes["project_options"] = _project_options(config.project_options, projects, path)
    changes["sources"] = (*config.sources, where)
    return replace(config, **changes)


def _project_options(
    start: Mapping[str, Mapping[str, OptionSetting]],
    projects: Mapping[str, Any],
    path: Path,
) -> dict[str, dict[str, OptionSetting]]:
    """``[projects.NAME.options]`` tables merged over ``start`` (a later file wins
    per option). Values are checked against the project's declarations when
    it is loaded, where the declarations are known."""
    where = str(path)
    text = path.read_text()
    merged = {name: dict(values) for name, values in start.items()}
    for name in projects:
        project = _table(projects, name, where)
        _known(project, {"options"}, where, f"projects.{name}.")
        options = _table(project, "options", where)
        for key, value in options.items():
            merged.setdefault(name, {})[key] = OptionSetting(
                value, where, _toml_line(text, ("projects", name, "options"), key)
            )
    return merged


def _toml_line(text: str, table: tuple[str, ...], key: str) -> int:
    """The line of ``key`` under the table ``[a.b.c]`` in ``text`` (best effort:
    tomllib keeps no positions). Falls back to the table's line, then to the
    enclosing table's line for the table (``options = {...}`` inline), then 1."""
    header = re.compile(
        r"^\s*\[\s*"
        + r"\s*\.\s*".join(f'(?:{re.escape(p)}|"{re.escape(p)}")' for p in table)
        + r"\s*\]\s*(#.*)?$"
    )
    key_re = re.compile(rf"^\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=")
    lines = text.splitlines()
    for number, line in enumerate(lines, start=1):
        if not header.match(line):
            continue
        for offset, below in enumerate(lines[number:], start=number + 1):
            if below.lstrip().startswith("["):
                break
            if key_re.match(below):
                return offset
        return number
    return _toml_line(text, table[:-1], table[-1]) if len(table) > 1 else 1


def _apply_env(config: RemexConfig, env: Mapping[str, str]) -> RemexConfig:
    changes: dict[str, Any] = {}
    used: list[str] = []
    if env.get("REMEX_BROKER_URL"):
        changes["broker_url"] = env["REMEX_BROKER_URL"]
        used.append("REMEX_BROKER_URL")
    if env.get("REMEX_RESULT_BACKEND"):
        changes["result_backend"] = env["REMEX_RESULT_BACKEND"]
        used.append("REMEX_RESULT_BACKEND")
    for key, (attr, _) in _BROKER_TLS.items():
        name = _broker_tls_env(key)
        if env.get(name):
            changes[attr] = Path(env[name]).expanduser().absolute()
            used.append(name)
    for remote_key, attr in _REMOTES.items():
        name = remote_key.upper().replace("-", "_")
        names = {
            key: f"REMEX_{name}_{key.upper().replace('-', '_')}"
            for key in (*_REMOTE_KEYS, *_CONNECTION_KEYS)
        }
        values = {key: env[var] for key, var in names.items() if env.get(var)}
        if values:
            start = getattr(config, attr) or Endpoint("")
            changes[attr] = _endpoint(
                start, values, "environment", f"REMEX_{name}_*", Path.cwd(), names=names
            )
            used.extend(names[k] for k in values)
    if env.get("REMEX_CAS_DIR"):
        changes["cas_dir"] = Path(env["REMEX_CAS_DIR"]).expanduser()
        used.append("REMEX_CAS_DIR")
    if env.get("REMEX_CAS_QUOTA"):
        changes["cas_quota_bytes"] = parse_size(env["REMEX_CAS_QUOTA"], where="REMEX_CAS_QUOTA")
        used.append("REMEX_CAS_QUOTA")
    if env.get("REMEX_CAS_DOWNLOAD"):
        changes["cas_download"] = _download(env["REMEX_CAS_DOWNLOAD"], "REMEX_CAS_DOWNLOAD")
        used.append("REMEX_CAS_DOWNLOAD")
    if env.get("REMEX_WORKER_CONCURRENCY"):
        changes["worker_concurrency"] = _positive(
            env["REMEX_WORKER_CONCURRENCY"], "REMEX_WORKER_CONCURRENCY"
        )
        used.append("REMEX_WORKER_CONCURRENCY")
    if env.get("REMEX_WORKER_FETCH_CONCURRENCY"):
        changes["fetch_concurrency"] = _positive(
            env["REMEX_WORKER_FETCH_CONCURRENCY"], "REMEX_WORKER_FETCH_CONCURRENCY"
        )
        used.append("REMEX_WORKER_FETCH_CONCURRENCY")
    if env.get("REMEX_WORKER_NICE"):
        changes["worker_nice"] = _nice(env["REMEX_WORKER_NICE"], "REMEX_WORKER_NICE")
        used.append("REMEX_WORKER_NICE")
    if env.get("REMEX_WORKER_STAGING"):
        changes["worker_staging"] = _count(env["REMEX_WORKER_STAGING"], "REMEX_WORKER_STAGING")
        used.append("REMEX_WORKER_STAGING")
    for name, attr in (
        ("REMEX_HEARTBEAT_TIMEOUT", "heartbeat_timeout"),
        ("REMEX_RECONCILE_INTERVAL", "reconcile_interval"),
    ):
        if env.get(name):
            changes[attr] = _seconds(env[name], name)
            used.append(name)
    fetch_env = {
        key: env[name]
        for key in _FETCH_KEYS
        if env.get(name := "REMEX_FETCH_" + key.upper().replace("-", "_"))
    }
    if fetch_env:
        changes["fetch"] = _fetch(config.fetch, fetch_env, "environment", Path.cwd(), env=True)
        used.extend("REMEX_FETCH_" + k.upper().replace("-", "_") for k in fetch_env)
    if env.get("REMEX_BOT_LOCAL_CAS"):
        value = env["REMEX_BOT_LOCAL_CAS"].strip().lower()
        if value not in ("1", "true", "yes", "0", "false", "no"):
            raise ConfigError(f"REMEX_BOT_LOCAL_CAS: must be true or false, not {value!r}")
        changes["bot_local_cas"] = value in ("1", "true", "yes")
        used.append("REMEX_BOT_LOCAL_CAS")
    if env.get("REMEX_BOT_CAS_DIR"):
        changes["bot_cas_dir"] = Path(env["REMEX_BOT_CAS_DIR"]).expanduser().absolute()
        used.append("REMEX_BOT_CAS_DIR")
    if env.get("REMEX_BOT_CAS_QUOTA"):
        changes["bot_cas_quota_bytes"] = parse_size(
            env["REMEX_BOT_CAS_QUOTA"], where="REMEX_BOT_CAS_QUOTA"
        )
        used.append("REMEX_BOT_CAS_QUOTA")
    if env.get("REMEX_BUILD_ON_ERROR"):
        changes["on_error"] = check_on_error(env["REMEX_BUILD_ON_ERROR"], "REMEX_BUILD_ON_ERROR")
        used.append("REMEX_BUILD_ON_ERROR")
    if used:
        changes["sources"] = (*config.sources, "environment: " + ", ".join(used))
    return replace(config, **changes)


def _fetch(
    start: FetchConfig, values: Mapping[str, Any], where: str, base: Path, *, env: bool = False
) -> FetchConfig:
    """``[fetch]`` (or its ``REMEX_FETCH_*`` variables) over ``start``; each bad value is
    named by its key (or variable) and ``where`` (the file)."""

    def name(key: str) -> str:
        return "REMEX_FETCH_" + key.upper().replace("-", "_") if env else f"fetch.{key}"

    _known(values, set(_FETCH_KEYS), where, "fetch.")
    changes: dict[str, Any] = {}
    for key, attr in _FETCH_KEYS.items():
        if key not in values:
            continue
        value = values[key]
        at = f"{where}: {name(key)}" if not env else name(key)
        if key in ("connect-timeout", "read-timeout", "backoff"):
            changes[attr] = _seconds(value, at)
        elif key == "retries":
            changes[attr] = _count(value, at)
        elif key == "ca-bundle":
            text = _str(value, where, name(key))
            bundle = _path(text, base, where, name(key)) if text else None
            if bundle is not None and not bundle.is_file():
                raise ConfigError(f"{at}: no such CA bundle file: {bundle}")
            changes[attr] = bundle
        else:
            changes[attr] = _str(value, where, name(key)) or None
    return replace(start, **changes)


def _endpoint(
    start: Endpoint,
    values: Mapping[str, Any],
    where: str,
    prefix: str,
    base: Path,
    *,
    names: Mapping[str, str] | None = None,
    text: str = "",
) -> Endpoint:
    """``start`` with the ``[remote.KEY]`` (or environment) ``values`` applied.

    ``names`` are the environment variables of the keys (errors name those);
    ``text`` is the file's text (errors name the key's line).
    """
    _known(values, {*_REMOTE_KEYS, *_CONNECTION_KEYS}, where, prefix + ".")
    changes: dict[str, Any] = {}
    for key, attr in _REMOTE_KEYS.items():
        if key not in values:
            continue
        value = _str(values[key], where, f"{prefix}.{key}")
        if attr in ("url", "instance_name"):
            changes[attr] = value
        else:
            changes[attr] = _path(value, base, where, f"{prefix}.{key}") if value else None
    connection: dict[str, Any] = {}
    for key, attr in _CONNECTION_KEYS.items():
        if key in values:
            if names is not None:
                place = names[key]
            else:
                line = _toml_line(text, tuple(prefix.split(".")), key) if text else 0
                place = f"{where}:{line}: {prefix}.{key}" if line else f"{where}: {prefix}.{key}"
            connection[attr] = _connection_value(key, values[key], place)
    if connection:
        changes["connection"] = replace(start.connection, **connection)
    endpoint = replace(start, **changes)
    if not endpoint.url:
        raise ConfigError(f"{where}: {prefix}.url is required")
    return endpoint


def _connection_value(key: str, value: Any, place: str) -> float | int:
    """A ``connection-config`` value, in remex's units (seconds).

    ``request-timeout`` (s) must be above 0; ``retry-limit`` a whole number
    from 0; ``retry-delay`` (ms, as BuildStream) and ``keepalive-time`` (s)
    from 0. Strings (environment variables) are read as numbers.

    Raises:
        ConfigError: naming ``place`` (the file, line and key, or the variable).
    """
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value) if key == "retry-limit" else float(value)
        except ValueError:
            number = None
    if key == "retry-limit":
        if not isinstance(number, int) or number < 0:
            raise ConfigError(f"{place}: must be a whole number from 0 up, not {value!r}")
        return number
    if number is None or number != number or number in (float("inf"), float("-inf")):
        number = -1.0  # not a number: refused below
    if key == "request-timeout":
        if number <= 0:
            raise ConfigError(f"{place}: must be a number of seconds above 0, not {value!r}")
        return float(number)
    if number < 0:
        unit = "milliseconds" if key == "retry-delay" else "seconds"
        raise ConfigError(f"{place}: must be a number of {unit} from 0 up, not {value!r}")
    return number / 1000.0 if key == "retry-delay" else float(number)


def _table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table")
    return value


def _known(data: Mapping[str, Any], keys: set[str], where: str, prefix: str) -> None:
    unknown = sorted(set(data) - keys)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {prefix}{unknown[0]} (known: {', '.join(sorted(keys))})"
        )


def check_on_error(value: str, where: str) -> str:
    """An on-error mode, checked.

    Raises:
        ConfigError: not one of :data:`ON_ERROR_MODES` (naming ``where``).
    """
    if value not in ON_ERROR_MODES:
        raise ConfigError(
            f"{where}: unknown on-error mode {value!r} (one of {', '.join(ON_ERROR_MODES)})"
        )
    return value


def _download(value: str, where: str) -> str:
    if value not in DOWNLOAD_MODES:
        raise ConfigError(
            f"{where}: must be one of {', '.join(map(repr, DOWNLOAD_MODES))}, not {value!r}"
        )
    return value


def _str(value: Any, where: str, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: {key} must be a string")
    return value


def _path(value: Any, base: Path, where: str, key: str) -> Path:
    path = Path(_str(value, where, key)).expanduser()
    return path if path.is_absolute() else base / path


def _seconds(value: Any, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = 0.0
    if seconds <= 0:
        raise ConfigError(f"{where}: must be a positive number of seconds, not {value!r}")
    return seconds


def _count(value: Any, where: str) -> int:
    """A whole number >= 0 (TOML integers; digit strings from the environment)."""
    if isinstance(value, bool) or not (
        (isinstance(value, int) and value >= 0)
        or (isinstance(value, str) and value.strip().isdigit())
    ):
        raise ConfigError(f"{where}: must be a whole number (0 or more), not {value!r}")
    return int(value)


def _nice(value: Any, where: str) -> int:
    """A nice value, 0-19 (raising a priority takes privileges)."""
    try:
        number = int(value) if not isinstance(value, (bool, float)) else -1
    except (TypeError, ValueError):
        number = -1
    if not 0 <= number <= 19:
        raise ConfigError(f"{where}: must be a whole number from 0 to 19, not {value!r}")
    return number


def _positive(value: Any, where: str) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1:
        raise ConfigError(f"{where}: must be a positive whole number, not {value!r}")
    return number
