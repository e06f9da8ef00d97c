"""Configuration: TOML → frozen dataclasses, defaults, validation.

Lookup order (SPEC §1): ``-c/--config``, ``$GEMINI_BATCHD_CONFIG``, ``/etc/gemini-batchd/config.toml``
if present, else built-in defaults. Unknown keys and bad values raise :class:`ConfigError` naming the
key; the CLI turns that into exit 78 (EX_CONFIG). Durations are seconds (floats), sizes are bytes.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

SYSTEM_CONFIG = Path("/etc/gemini-batchd/config.toml")
MODEL_ID_RE = re.compile(r"^[a-z0-9][a-z0-9.-]*$")
MiB = 1024 * 1024


class ConfigError(Exception):
    """A config file that cannot be used; the message names the key."""


@dataclass(frozen=True)
class PathsConfig:
    root: Path = Path("./gemini-batchd")
    inbox: Path | None = None
    outbox: Path | None = None
    state: Path | None = None
    socket: Path | None = None
    socket_group: str | None = None


@dataclass(frozen=True)
class GeminiConfig:
    api_key_file: Path | None = None
    base_url: str | None = None  # None: Google's endpoint (the SDK default)
    api_version: str = "v1beta"
    default_model: str = "gemini-2.5-flash"


@dataclass(frozen=True)
class ApiConfig:
    timeout: float = 120.0  # every API call; uploads and downloads per chunk
    max_rps: float = 10.0  # cap on API calls per second, all stages together
    backoff_initial: float = 5.0  # first wait after 429/5xx/timeout
    backoff_max: float = 300.0


@dataclass(frozen=True)
class InboxConfig:
    settle_seconds: float = 1.0
    rescan_seconds: float = 30.0
    force_polling: bool = False
    max_line_bytes: int = 32 * MiB
    parallel_validation_bytes: int = 64 * MiB  # bigger files are validated on two cores; 0 = never
    media_dir: Path | None = None  # default <root>/media


@dataclass(frozen=True)
class SubmitConfig:
    inline_max_bytes: int = 8 * MiB
    max_requests_per_job: int = 100_000
    max_job_bytes: int = 1_900_000_000
    max_active_jobs: int = 50
    max_enqueued_tokens: int = 0  # per model; 0 = no local cap (the API's 429 still applies)
    retry_failed_requests: int = 1
    dedupe: bool = True
    idle_seconds: float = 30.0  # safety-net timer of the submit loop (nudges do the work)


@dataclass(frozen=True)
class PollConfig:
    workers: int = 4
    min_interval: float = 5.0
    max_interval: float = 60.0
    stuck_after: float = 86_400.0
    # A job SUCCEEDED without its results file yet is asked again for this long (the API can
    # report SUCCEEDED before responsesFile is populated) before its results count as lost.
    results_grace: float = 900.0


@dataclass(frozen=True)
class OutboxConfig:
    extract_media: bool = True


@dataclass(frozen=True)
class CleanupConfig:
    keep_remote: bool = False


@dataclass(frozen=True)
class DaemonConfig:
    shutdown_seconds: float = 10.0
    log_level: str = "info"
    log_format: str = "auto"  # auto | json | console
    io_retry_initial: float = 1.0  # first wait after a full / read-only disk or EIO, doubling
    io_retry_max: float = 60.0  # longest wait between two tries of work paused on the disk


@dataclass(frozen=True)
class ControlConfig:
    header_timeout: float = 10.0  # a connection's first request header must arrive within this
    idle_timeout: float = 10.0  # a connection idle (or half-sent) this long is closed
    max_connections: int = 256  # beyond it a new connection gets 503 and is closed at once


@dataclass(frozen=True)
class Price:
    """Interactive list prices in USD per million tokens; the batch discount (50%) is applied."""

    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    gemini: GeminiConfig = field(default_factory=GeminiConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    inbox: InboxConfig = field(default_factory=InboxConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    poll: PollConfig = field(default_factory=PollConfig)
    outbox: OutboxConfig = field(default_factory=OutboxConfig)
    cleanup: CleanupConfig = field(default_factory=CleanupConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    prices: dict[str, Price] = field(default_factory=dict)
    source: str | None = None  # the file it came from, if any

    # Resolved folders (relative paths are taken from the current directory at load time).
    @property
    def root(self) -> Path:
        return self.paths.root

    @property
    def inbox_dir(self) -> Path:
        return self.paths.inbox or self.root / "inbox"

    @property
    def outbox_dir(self) -> Path:
        return self.paths.outbox or self.root / "outbox"

    @property
    def state_dir(self) -> Path:
        return self.paths.state or self.root / "state"

    @property
    def socket_path(self) -> Path:
        return self.paths.socket or self.root / "control.sock"

    @property
    def media_dir(self) -> Path:
        return self.inbox.media_dir or self.root / "media"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "gemini-batchd.sqlite"

    def replace(self, **sections: Any) -> Config:
        return dataclasses.replace(self, **sections)


_SECTIONS: dict[str, type] = {
    "paths": PathsConfig,
    "gemini": GeminiConfig,
    "api": ApiConfig,
    "inbox": InboxConfig,
    "submit": SubmitConfig,
    "poll": PollConfig,
    "outbox": OutboxConfig,
    "cleanup": CleanupConfig,
    "daemon": DaemonConfig,
    "control": ControlConfig,
}


def _convert(key: str, value: Any, typ: Any, base: Path) -> Any:
    text = str(typ)
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number of seconds, got {value!r}")
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
        return float(value)
    if "Path" in text:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{key}: expected a path string, got {value!r}")
        p = Path(os.path.expandvars(os.path.expanduser(value)))
        return p if p.is_absolute() else base / p
    if "str" in text:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type")  # pragma: no cover


def _section(name: str, cls: type, raw: Any, base: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"[{name}]: expected a table")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"unknown key [{name}] {key}")
        values[key] = _convert(f"[{name}] {key}", value, hints[key], base)
    return cls(**values)


def _validate(cfg: Config) -> None:
    if not MODEL_ID_RE.match(cfg.gemini.default_model):
        raise ConfigError(f"[gemini] default_model: not a model id: {cfg.gemini.default_model!r}")
    if cfg.gemini.api_version not in {"v1", "v1beta", "v1alpha"}:
        raise ConfigError(
            f"[gemini] api_version: expected v1beta or v1, got {cfg.gemini.api_version!r}"
        )
    if cfg.daemon.log_format not in {"auto", "json", "console"}:
        raise ConfigError(
            f"[daemon] log_format: expected auto, json or console, got {cfg.daemon.log_format!r}"
        )
    if cfg.daemon.log_level.lower() not in {"debug", "info", "warning", "error", "critical"}:
        raise ConfigError(f"[daemon] log_level: unknown level {cfg.daemon.log_level!r}")
    if cfg.submit.inline_max_bytes > 19 * MiB:
        raise ConfigError("[submit] inline_max_bytes: must stay below the API's 20 MB inline limit")
    if cfg.submit.max_job_bytes > 2_000_000_000 or cfg.submit.max_job_bytes < 1024:
        raise ConfigError(
            "[submit] max_job_bytes: must be between 1 KiB and the API's 2 GB input limit"
        )
    for key in ("max_requests_per_job", "max_active_jobs"):
        if getattr(cfg.submit, key) < 1:
            raise ConfigError(f"[submit] {key}: must be at least 1")
    if cfg.poll.workers < 1:
        raise ConfigError("[poll] workers: must be at least 1")
    if cfg.poll.min_interval <= 0 or cfg.poll.max_interval < cfg.poll.min_interval:
        raise ConfigError("[poll] max_interval: must be >= min_interval > 0")
    if cfg.poll.results_grace < 0:
        raise ConfigError("[poll] results_grace: must be >= 0")
    if cfg.api.max_rps <= 0:
        raise ConfigError("[api] max_rps: must be > 0")
    if min(cfg.control.header_timeout, cfg.control.idle_timeout) <= 0:
        raise ConfigError("[control] header_timeout, idle_timeout: must be > 0")
    if cfg.control.max_connections < 1:
        raise ConfigError("[control] max_connections: must be >= 1")
    if cfg.api.timeout <= 0:
        raise ConfigError("[api] timeout: must be > 0")
    if cfg.inbox.settle_seconds <= 0 or cfg.inbox.rescan_seconds <= 0:
        raise ConfigError("[inbox] settle_seconds and rescan_seconds: must be > 0")
    if not 0 < cfg.daemon.io_retry_initial <= cfg.daemon.io_retry_max:
        raise ConfigError("[daemon] io_retry_max: must be >= io_retry_initial > 0")
    if cfg.inbox.parallel_validation_bytes < 0:
        raise ConfigError("[inbox] parallel_validation_bytes: must be >= 0 (0 = never)")


def parse_config(
    data: dict[str, Any], *, base: Path | None = None, source: str | None = None
) -> Config:
    """Build a validated :class:`Config` from parsed TOML data."""
    base = base or Path.cwd()
    sections: dict[str, Any] = {}
    prices: dict[str, Price] = {}
    for name, raw in data.items():
        if name == "prices":
            if not isinstance(raw, dict):
                raise ConfigError("[prices]: expected a table of models")
            for model, p in raw.items():
                prices[model] = _section(f'prices."{model}"', Price, p, base)
            continue
        cls = _SECTIONS.get(name)
        if cls is None:
            raise ConfigError(f"unknown section [{name}]")
        sections[name] = _section(name, cls, raw, base)
    paths = sections.get("paths", PathsConfig())
    if (
        not paths.root.is_absolute()
    ):  # the default ./gemini-batchd is taken from the working directory
        paths = dataclasses.replace(paths, root=Path.cwd() / paths.root)
    sections["paths"] = paths
    cfg = Config(**sections, prices=prices, source=source)
    cfg = _apply_systemd_env(cfg)
    _validate(cfg)
    return cfg


def _apply_systemd_env(cfg: Config) -> Config:
    """Honour systemd's directories when the config leaves the folder unset."""
    paths = cfg.paths
    state_env = os.environ.get("STATE_DIRECTORY")
    runtime_env = os.environ.get("RUNTIME_DIRECTORY")
    if state_env and paths.state is None:
        paths = dataclasses.replace(paths, state=Path(state_env.split(":")[0]))
    if runtime_env and paths.socket is None:
        paths = dataclasses.replace(paths, socket=Path(runtime_env.split(":")[0]) / "control.sock")
    return dataclasses.replace(cfg, paths=paths)


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Load the config from the first place that has one (see module docstring)."""
    candidate: Path | None = None
    if path:
        candidate = Path(path)
    elif os.environ.get("GEMINI_BATCHD_CONFIG"):
        candidate = Path(os.environ["GEMINI_BATCHD_CONFIG"])
    elif SYSTEM_CONFIG.exists():
        candidate = SYSTEM_CONFIG
    if candidate is None:
        return parse_config({})
    try:
        with candidate.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{candidate}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{candidate}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{candidate}: invalid TOML: {e}") from None
    return parse_config(data, base=candidate.resolve().parent, source=str(candidate))


def read_api_key(cfg: Config) -> str | None:
    """The API key: systemd credential, ``[gemini] api_key_file``, then the environment."""
    cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
    candidates: list[Path] = []
    if cred_dir:
        candidates.append(Path(cred_dir) / "gemini-api-key")
    if cfg.gemini.api_key_file:
        candidates.append(cfg.gemini.api_key_file)
    for p in candidates:
        try:
            key = p.read_text().strip()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise ConfigError(f"[gemini] api_key_file: cannot read {p}: {e.strerror}") from None
        if key:
            return key
    for var in ("GEMINI_API_KEY", "GOOGLE_API_KEY"):
        if os.environ.get(var, "").strip():
            return os.environ[var].strip()
    return None
