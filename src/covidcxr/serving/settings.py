"""What ``covidcxr serve`` can be told: :class:`ServiceSettings` (validated) and where the token comes from.

Every number is checked here (finite, positive, below a sane maximum; booleans are not numbers), so
``--max-upload-mb nan`` or ``--timeout inf`` is a one-line :class:`~covidcxr.errors.ConfigError`,
never a traceback. The API token is read from ``COVIDCXR_TOKEN`` (or the older
``COVIDCXR_API_TOKEN``), from ``--token-file PATH`` (refused when other users can read it), or from
``--token`` (works, with a warning: every user on the machine sees it in ``ps``).
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Callable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from covidcxr.errors import ConfigError, validation_problems

#: Host names a local service answers to whatever ``--host`` says (DNS-rebinding defence).
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
TOKEN_ENV = "COVIDCXR_TOKEN"
LEGACY_TOKEN_ENV = "COVIDCXR_API_TOKEN"
MAX_TOKEN_FILE_BYTES = 4096
MAX_UPLOAD_MB = 1024.0


class ServiceSettings(BaseModel):
    """Everything ``covidcxr serve`` can be told; validated (pydantic, no NaN / inf, no extra keys)."""

    model_config = ConfigDict(allow_inf_nan=False, extra="forbid")

    backend: Literal["torch", "onnx"] = "torch"
    token: str | None = Field(None, description="API token; when set, everything but /, /static and /healthz needs it")
    audit_db: str | None = Field(None, description="SQLAlchemy URL; default sqlite file RUN_DIR/audit.sqlite")
    heatmaps: bool = Field(True, description="compute Grad-CAM overlays (needs the PyTorch model)")
    allow_non_frontal: bool = False
    # -- the plausibility gate (covidcxr.data.plausibility.InputChecks): overridable, never silently off
    min_side: int = Field(64, ge=1, le=4096, description="smallest width / height accepted (pixels)")
    max_aspect: float = Field(4.0, ge=1, le=100, description="largest longer / shorter side ratio")
    content_checks: bool = Field(True, description="refuse near-constant and noise-like images")
    # -- the image
    max_upload_bytes: int = Field(32 * 1024 * 1024, gt=0, le=int(MAX_UPLOAD_MB * 2**20))
    max_pixels: int = Field(25_000_000, gt=0, le=64_000_000,
                            description="largest width x height decoded (checked from the header, before decoding)")
    decode_timeout_s: float = Field(10.0, gt=0, le=600, description="decode + preprocessing budget of one upload")
    timeout_s: float = Field(30.0, gt=0, le=600, description="whole prediction, queueing included (504 after)")
    # -- inference
    workers: int = Field(2, ge=1, le=64, description="inference threads")
    max_queue: int = Field(16, ge=0, le=1000, description="predictions waiting for a thread before 503")
    # -- connections and request bodies
    header_timeout_s: float = Field(10.0, gt=0, le=300, description="connection open -> complete request headers")
    body_timeout_s: float = Field(60.0, gt=0, le=3600, description="request headers -> complete body (408 after)")
    keep_alive_s: int = Field(5, ge=1, le=300, description="idle keep-alive connections are closed after this")
    max_connections: int = Field(128, ge=1, le=10_000, description="uvicorn limit_concurrency (503 above)")
    max_connections_per_client: int = Field(32, ge=1, le=10_000)
    max_uploads: int = Field(32, ge=1, le=10_000, description="POST /v1/predict in flight at once (503 above)")
    max_uploads_per_client: int = Field(8, ge=1, le=10_000, description="... from one client address (429 above)")
    # -- who may talk to the service
    allowed_hosts: list[str] | None = Field(None, description="Host header values accepted (default: LOCAL_HOSTS)")
    allowed_origins: list[str] = Field(default_factory=list,
                                       description="extra Origins allowed to POST (same-origin always is)")
    forwarded_allow_ips: str | None = Field(None, description="trust X-Forwarded-For from these proxy addresses")

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, values):
        if isinstance(values, dict):
            for key, value in values.items():
                field = cls.model_fields.get(key)
                if isinstance(value, bool) and field is not None and field.annotation in (int, float):
                    raise ValueError(f"{key}: expected a number, got {value!r}")
        return values

    @model_validator(mode="after")
    def _consistent(self):
        if self.token is not None and not self.token.strip():
            raise ValueError("token: must not be empty (leave it unset to serve without a token)")
        if self.token is not None and not (self.token.isascii() and self.token.isprintable()):
            raise ValueError("token: must be printable ASCII (it travels in an HTTP header)")
        if self.max_uploads_per_client > self.max_uploads:
            raise ValueError(f"max_uploads_per_client ({self.max_uploads_per_client}) is above max_uploads "
                             f"({self.max_uploads})")
        for host in self.allowed_hosts or ():
            if not host or "*" in host[1:] or (host.startswith("*") and not host.startswith("*.")):
                raise ValueError(f"allowed_hosts: {host!r} is not a host name, an address or '*.domain'")
        return self

    def input_checks(self):
        from covidcxr.data.plausibility import InputChecks

        return InputChecks(min_side=self.min_side, max_aspect=self.max_aspect, content=self.content_checks)

    def hosts(self) -> list[str]:
        return list(self.allowed_hosts) if self.allowed_hosts is not None else list(LOCAL_HOSTS)


def parse_settings(**values) -> ServiceSettings:
    """:class:`ServiceSettings` or a :class:`ConfigError` naming every bad option (CLI and library)."""
    try:
        return ServiceSettings(**values)
    except ValidationError as exc:
        problems = validation_problems(exc, root="settings")
        raise ConfigError(f"serve settings: {problems}") from None


def upload_bytes(max_upload_mb: float) -> int:
    """``--max-upload-mb`` -> bytes; NaN, inf, zero, negative and absurd sizes are a ConfigError."""
    if isinstance(max_upload_mb, bool) or not isinstance(max_upload_mb, (int, float)) \
            or not math.isfinite(max_upload_mb) or not 0 < max_upload_mb <= MAX_UPLOAD_MB:
        raise ConfigError(f"serve settings: max_upload_mb: must be a finite number of MiB in (0, {MAX_UPLOAD_MB:g}], "
                          f"got {max_upload_mb!r}")
    return max(1, int(max_upload_mb * 2**20))


def resolve_token(cli_token: str | None, token_file: str | os.PathLike | None,
                  environ: Mapping[str, str] = os.environ,
                  warn: Callable[[str], None] = lambda message: None) -> str | None:
    """The API token from exactly one source: ``--token-file``, ``--token`` or the environment."""
    env_name = next((n for n in (TOKEN_ENV, LEGACY_TOKEN_ENV) if environ.get(n)), None)
    if TOKEN_ENV in environ and LEGACY_TOKEN_ENV in environ and environ[TOKEN_ENV] != environ[LEGACY_TOKEN_ENV]:
        raise ConfigError(f"{TOKEN_ENV} and {LEGACY_TOKEN_ENV} are both set and differ; set one")
    given = [name for name, value in (("--token", cli_token), ("--token-file", token_file)) if value is not None]
    if len(given) > 1:
        raise ConfigError("give the API token one way: --token-file PATH or the COVIDCXR_TOKEN variable (not both "
                          "--token and --token-file)")
    if token_file is not None:
        return read_token_file(token_file, warn)
    if cli_token is not None:
        warn("--token is visible to every user of this machine in the process list (ps); "
             f"use {TOKEN_ENV}=... or --token-file PATH instead")
        return cli_token
    return environ[env_name] if env_name else None


def read_token_file(path: str | os.PathLike, warn: Callable[[str], None] = lambda message: None) -> str:
    """The token in ``path`` (one line). Refused when others may read it or anyone else may write it;
    a group-readable file is accepted with a warning (a service group is a legitimate set-up)."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"token file {path}: cannot be read ({exc.strerror or exc.__class__.__name__})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"token file {path}: not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP):
        raise ConfigError(f"token file {path}: other users can read or change it (mode {mode:04o}); "
                          f"run `chmod 600 {path}`")
    if mode & stat.S_IRGRP:
        warn(f"token file {path} is readable by its group (mode {mode:04o}); `chmod 600 {path}` unless that is meant")
    if st.st_size > MAX_TOKEN_FILE_BYTES:
        raise ConfigError(f"token file {path}: {st.st_size:,} bytes is not a token (limit {MAX_TOKEN_FILE_BYTES})")
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"token file {path}: cannot be read ({exc.__class__.__name__})") from None
    if not text or any(c.isspace() for c in text):
        raise ConfigError(f"token file {path}: must hold the token on one line, without spaces")
    return text
