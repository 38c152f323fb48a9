"""The one settings object. Nothing else in the project reads the environment.

Names are the operations guide's (`ENVIRONMENT`, `DB_URL`, ...); anything not set falls back to
the embedded default so that a bare machine runs the service with no configuration at all.
"""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET_KEY = "dev-insecure-secret-key-change-me"

IPNetwork = IPv4Network | IPv6Network


@lru_cache(maxsize=8)
def parse_networks(spec: str) -> tuple[IPNetwork, ...]:
    """`10.0.0.0/8, 192.168.1.7` -> networks (a bare address is a /32 or /128); ValueError names
    an entry that is not an address or a network (host bits set, as in `10.1.2.3/8`, included)."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        try:
            out.append(ip_network(entry))
        except ValueError as exc:
            raise ValueError(f"{entry!r} is not an IP address or network in CIDR notation "
                             f"(e.g. 10.0.0.0/8): {exc}") from None
    return tuple(out)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, case_sensitive=True, extra="ignore")

    ENVIRONMENT: Literal["development", "test", "staging", "production"] = "development"
    """Outside development and test, placeholder secrets are refused."""
    SECRET_KEY: str = DEV_SECRET_KEY
    """Keys API-key hashes and webhook signatures."""
    DB_URL: str | None = None
    """SQLAlchemy URL; unset means a local SQLite file under STORAGE_BASE_PATH."""
    REDIS_URL: str | None = None
    """Unset means in-process rate limits and progress."""
    HF_TOKEN: str | None = None
    """Only for hub downloads in production (gated pyannote pipelines)."""
    AI_DEVICE: Literal["cpu", "cuda", "auto"] = "cpu"
    """cuda runs fp16 + SDPA; cpu runs fp32; auto picks cuda when one is present."""
    WHISPER_MODEL_PATH: str = "tiny.en"
    """A packaged name (tiny.en, base), a local transformers directory, or a hub id."""
    DIARIZATION_MODEL_PATH: str = "packaged"
    """`packaged` (offline checkpoints), a local pyannote pipeline directory, or a hub id."""
    STORAGE_TYPE: Literal["local"] = "local"
    """Where uploads and job audio live. Only `local` exists: a directory (STORAGE_BASE_PATH)
    that every replica sees, i.e. a ReadWriteMany volume on Kubernetes. Any other value is
    refused at start (get_settings), never silently treated as local."""
    STORAGE_BASE_PATH: Path = Path("var/storage")
    AUDIO_MAX_FILE_SIZE: int = Field(default=100 * 1024 * 1024, ge=1)
    """Bytes; uploads past it are refused while streaming."""
    AUDIO_MAX_DURATION_S: float = Field(default=4 * 3600.0, gt=0)
    """Decoded audio longer than this is refused before any model time is spent."""
    UPLOAD_STALL_TIMEOUT_S: float = Field(default=30.0, gt=0)
    """An upload whose body sends nothing for this long is answered 408 and dropped."""
    UPLOAD_MIN_RATE_BPS: int = Field(default=1000, ge=0)
    """Past its first UPLOAD_STALL_TIMEOUT_S an upload must average at least this many bytes per
    second (0 = no floor), or it is answered 408: a client trickling a byte every few seconds
    never stalls, and would otherwise hold a request for Ray's 10-minute timeout."""
    STORAGE_QUOTA_BYTES: int = Field(default=0, ge=0)
    """Bytes of audio storage (stored audio + uploads in progress); 0 = unlimited. An upload that
    would pass it is refused with 507 while it is copied, and leaves nothing behind."""
    MODEL_CACHE_DIR: Path = Path.home() / ".cache" / "speech-service" / "models"
    """Where packaged CTranslate2 models are converted to transformers format, once."""
    DB_POOL_SIZE: int = Field(default=5, ge=1)
    """Connections kept open per process on PostgreSQL (SQLite uses none)."""
    DB_MAX_OVERFLOW: int = Field(default=10, ge=0)
    """Extra PostgreSQL connections allowed under burst, closed when returned."""
    RATE_LIMIT_PER_MINUTE: int = Field(default=100, ge=0)
    """Requests per client IP in any 60 s window; 0 disables the IP limit."""
    RATE_LIMIT_KEY_PER_MINUTE: int = Field(default=100, ge=0)
    """Requests per API key in any 60 s window; 0 disables the key limit."""
    TRUSTED_PROXIES: str = ""
    """Comma-separated addresses or CIDRs of the reverse proxies in front of the service (the
    Kubernetes Ingress controller's pods, an nginx); empty = trust none. From a trusted peer the
    client is the rightmost `X-Forwarded-For` address that is not itself trusted; from any other
    peer the header is ignored (serve.auth.client_ip, for rate limits, logs and audit)."""
    JOB_LEASE_S: float = Field(default=60.0, gt=0)
    """A running job whose lease is not renewed for this long is claimed again."""
    JOB_HEARTBEAT_S: float = Field(default=15.0, gt=0)
    """How often a runner renews the lease of the job it works on (well under JOB_LEASE_S)."""
    JOB_MAX_ATTEMPTS: int = Field(default=3, ge=1)
    """Claims per job before it is failed with the last reason."""
    JOB_POLL_S: float = Field(default=1.0, gt=0)
    """Idle runner wait between looks at the queue."""
    JOB_EVENTS_MAX_S: float = Field(default=540.0, gt=0)
    """A job's event stream ends itself after this long (under Serve's request_timeout_s, 600 s)
    with a `retry:` hint; the client reconnects with Last-Event-ID and resumes where it was."""
    JOB_RUNNER_CONCURRENCY: int = Field(default=2, ge=0)
    """Jobs one JobRunnerDeployment replica works on at once: its claim loops (0: its replicas run
    none and jobs wait for a standalone `python -m serve.job_runner`). The Ingress runs no jobs."""
    JOB_RETENTION_DAYS: float = Field(default=30.0, gt=0)
    """Finished jobs, their results and audio are deleted this long after they finish."""
    WEBHOOK_SECRET: str | None = None
    """HMAC key of webhook signatures; unset derives one from SECRET_KEY."""
    WEBHOOK_ALLOW_INTERNAL: bool = False
    """Allow callback_url to loopback/private/link-local addresses (tests, trusted networks)."""
    WEBHOOK_MAX_ATTEMPTS: int = Field(default=5, ge=1)
    WEBHOOK_BACKOFF_S: float = Field(default=1.0, ge=0)
    """First retry delay; doubled after each failed delivery."""
    WEBHOOK_TIMEOUT_S: float = Field(default=5.0, gt=0)
    LOG_LEVEL: str = "INFO"
    LOG_FILE: Path | None = None
    """When set, JSON logs also go to this file, rotated at 10 MB, 5 files kept."""

    @field_validator("TRUSTED_PROXIES")
    @classmethod
    def _valid_networks(cls, value: str) -> str:
        parse_networks(value)  # raises ValueError naming the entry
        return value

    @property
    def trusted_proxy_networks(self) -> tuple[IPNetwork, ...]:
        return parse_networks(self.TRUSTED_PROXIES)

    @model_validator(mode="after")
    def _refuse_placeholder_secrets(self) -> Settings:
        if self.ENVIRONMENT in ("staging", "production") and self.SECRET_KEY == DEV_SECRET_KEY:
            raise ValueError("SECRET_KEY must be set outside development and test")
        return self

    @property
    def database_url(self) -> str:
        if self.DB_URL:
            return self.DB_URL
        return f"sqlite:///{(self.STORAGE_BASE_PATH / 'service.db').resolve()}"


class SettingsError(ValueError):
    """The environment holds a value the service cannot run with. The message names each
    variable, the value it holds and what is accepted instead (no pydantic report)."""


def _describe(error: Any) -> str:
    """One line per refused variable: `NAME='value' is not supported; supported values: ...`."""
    loc = error.get("loc") or ()
    msg = str(error.get("msg", "")).removeprefix("Value error, ")
    if not loc:  # a model validator: its message already names the variable
        return msg
    name = str(loc[0])
    given = f"{name}={error.get('input')!r}"
    field = Settings.model_fields.get(name)
    if error.get("type") == "literal_error" and field is not None:
        allowed = next((get_args(t) for t in (field.annotation, *get_args(field.annotation))
                        if get_origin(t) is Literal), ())
        if allowed:
            return f"{given} is not supported; supported values: {', '.join(map(str, allowed))}"
    return f"{given} is not valid: {msg}"


def load_settings() -> Settings:
    """Settings from the environment; a refused value raises `SettingsError` with a readable
    message instead of pydantic's ValidationError."""
    try:
        return Settings()
    except ValidationError as exc:
        lines = [_describe(e) for e in exc.errors()]
        raise SettingsError("invalid configuration: " + "; ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment (`SettingsError` when the
    environment holds a value the service refuses; nothing is cached then)."""
    return load_settings()
