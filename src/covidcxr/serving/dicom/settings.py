"""What ``covidcxr dicom listen`` / ``score`` can be told: :class:`NodeSettings` (validated), from YAML + options.

A node configuration file (``--config node.yaml``) is a YAML mapping of these fields; options given
on the command line override it::

    ae_title: COVIDCXR              # this node's AE title
    host: 0.0.0.0                   # interface to listen on (default 127.0.0.1)
    port: 11112
    allowed_callers: [ORTHANC, CR_ROOM_2]   # calling AE titles that may send (everyone else is rejected)
    destination: {ae_title: ORTHANC, host: pacs.example.org, port: 4242}   # where results go (C-STORE)
    spool: /var/lib/covidcxr/spool  # received instances waiting for the model + the queue database
    keep_folder: null               # set to keep each processed instance (default: deleted)
    audit_db: null                  # SQLAlchemy URL (default: sqlite file SPOOL/dicom-audit.sqlite)
"""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from covidcxr.errors import ConfigError, validation_problems

#: DICOM AE titles: 1 to 16 characters of the default repertoire, no backslash, not all spaces.
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def _check_ae_title(value: str) -> str:
    value = str(value).strip()
    if not _AE_TITLE.match(value) or not value:
        raise ValueError(f"{value!r} is not a DICOM AE title (1 to 16 printable ASCII characters, no backslash)")
    return value


class Destination(BaseModel):
    """A DICOM node that receives the results (the PACS): AE title, host and port."""

    model_config = ConfigDict(extra="forbid")

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)


class NodeSettings(BaseModel):
    """Everything the DICOM node can be told; validated (no extra keys, ports in range, AE titles legal)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    ae_title: str = "COVIDCXR"
    host: str = "127.0.0.1"
    port: int = Field(11112, ge=0, le=65535, description="0 picks a free port (tests)")
    allowed_callers: list[str] = Field(default_factory=list, description="calling AE titles allowed to send")
    destination: Destination | None = Field(None, description="C-STORE SCP that receives the SR and overlay")
    spool: Path | None = Field(None, description="queue folder (default RUN_DIR/dicom-spool)")
    keep_folder: Path | None = Field(None, description="keep processed instances here (default: delete them)")
    audit_db: str | None = Field(None, description="SQLAlchemy URL (default sqlite SPOOL/dicom-audit.sqlite)")
    allow_non_frontal: bool = False
    heatmaps: bool = Field(True, description="send a Secondary Capture with the Grad-CAM overlay")
    max_pdu: int = Field(0, ge=0, le=2**31, description="largest PDU received (0 = unlimited)")
    network_timeout_s: float = Field(60.0, gt=0, le=3600)
    max_instance_bytes: int = Field(256 * 2**20, gt=0, description="larger instances are refused (A700)")

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, v: str) -> str:
        return _check_ae_title(v)

    @field_validator("allowed_callers")
    @classmethod
    def _callers(cls, v: list[str]) -> list[str]:
        return [_check_ae_title(x) for x in v]

    def spool_dir(self, run_dir: str | Path) -> Path:
        return Path(self.spool) if self.spool is not None else Path(run_dir) / "dicom-spool"

    def audit_url(self, run_dir: str | Path) -> str:
        if self.audit_db:
            return self.audit_db
        return f"sqlite:///{(self.spool_dir(run_dir) / 'dicom-audit.sqlite').resolve()}"


def load_node_settings(config: str | Path | None = None, **overrides) -> NodeSettings:
    """The YAML file ``config`` (if any) with ``overrides`` (``None`` values ignored) -> :class:`NodeSettings`."""
    tree: dict = {}
    origin = "dicom node settings"
    if config is not None:
        from covidcxr.training.config import read_yaml_mapping

        config = Path(config)
        origin = str(config)
        tree = read_yaml_mapping(config, missing="node configuration file not found",
                                 not_a_mapping="the top level must be a mapping (ae_title, port, allowed_callers, ...)")
    for key, value in overrides.items():
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        tree[key] = value
    try:
        return NodeSettings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(f"{origin}: {validation_problems(exc, unknown_key='unknown setting')}") from None


def parse_destination(text: str) -> Destination:
    """``AET@host:port`` (the command line's ``--destination``) -> :class:`Destination`."""
    match = re.match(r"^([^@]+)@(.+):(\d+)$", text.strip())
    if not match:
        raise ConfigError(f"--destination {text!r}: expected AE_TITLE@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242")
    try:
        return Destination(ae_title=match[1], host=match[2], port=int(match[3]))
    except ValidationError as exc:
        raise ConfigError(f"--destination {text!r}: {validation_problems(exc)}") from None
