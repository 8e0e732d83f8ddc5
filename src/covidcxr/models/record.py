"""The run record (``run.json``): what a trained model is, typed, versioned and integrity-checked.

:class:`RunRecord` is the one schema of ``run.json``; :func:`write_run_record` is its one writer and
:func:`read_run_record` its one reader. Training, k-fold ensembles, ONNX export and calibration all
change a record through :func:`update_run_record`, which re-reads (and so re-verifies) it first.

Integrity. The writer stores a SHA-256 of every top-level field and one over all of them
(``integrity``). The reader recomputes them and refuses a record whose content changed since it was
written, naming the fields that changed (``classes``, ``threshold``, ``preprocess``,
``model_sha256`` ...). Because ``model_sha256`` is itself a covered field, swapping the weights *and*
writing their new hash into ``run.json`` is refused too. This protects against accidental edits,
corruption, copy mistakes and careless tampering. It does not stop someone who recomputes the
hashes with this code: against deliberate tampering set ``COVIDCXR_RUN_KEY`` (a secret) when the
run is written and when it is loaded; the record then carries an HMAC-SHA256 that only holders of
the key can produce (see docs/models.md, "Threat model").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
from pathlib import Path
from typing import Callable, Literal, Optional, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from covidcxr.data.preprocess import PreprocessSpec
from covidcxr.errors import CovidCXRError, WeightsError, validation_problems
from covidcxr.files import dumps_json, write_json
from covidcxr.models.provenance import Provenance

R = TypeVar("R", bound=BaseModel)

RUN_JSON = "run.json"
MODEL_FILE = "model.safetensors"
SPLIT_FILE = "split.csv"
RUN_FORMAT = "covidcxr-run/2"
#: The run.json format of a lung segmenter (covidcxr.models.segmenter); same integrity block.
SEGMENTER_FORMAT = "covidcxr-segmenter/1"
#: Environment variable holding the secret for the record's HMAC (optional).
RUN_KEY_ENV = "COVIDCXR_RUN_KEY"
_SHA256 = r"^[0-9a-f]{64}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OnnxExport(_Strict):
    """``covidcxr export --format onnx`` into the run directory."""

    file: str
    sha256: str = Field(pattern=_SHA256)
    source_model_sha256: str = Field(pattern=_SHA256)
    opset: int
    exporter: str
    torch: str
    onnx: str
    input: str
    output: str
    parity_max_abs_diff: float


class RunSplit(_Strict):
    """The rows the run was trained, validated and tested on (``split.csv`` in the run directory)."""

    file: str = SPLIT_FILE
    sha256: str = Field(pattern=_SHA256)
    column: str  # the column of split.csv that holds train / val / test / external
    counts: dict[str, int] = {}
    # The folders the training manifest's images were allowed to lie in (its own folder and the data
    # root): split.csv, written in the run directory, may read its rows from there and nowhere else.
    image_roots: list[str] = []


class Integrity(_Strict):
    algorithm: Literal["sha256"] = "sha256"
    fields: dict[str, str]
    record_sha256: str = Field(pattern=_SHA256)
    hmac_sha256: Optional[str] = None


class RunRecord(_Strict):
    """``run.json``: a model's architecture, classes, preprocessing, threshold and provenance."""

    format: Literal["covidcxr-run/2"] = RUN_FORMAT
    architecture: str  # a registry name, or "ensemble"
    classes: list[str] = Field(min_length=2)
    positive_class: Optional[str] = None
    label_space: Optional[dict] = None
    preprocess: PreprocessSpec
    threshold: Optional[float] = None  # on P(positive_class), chosen on validation data
    model_sha256: str = Field(pattern=_SHA256)
    members: list[str] = []  # ensembles: member run directories, relative to this one
    tta: list[Literal["hflip"]] = []
    onnx: Optional[OnnxExport] = None
    calibration: Optional[dict] = None
    split: Optional[RunSplit] = None
    info: dict = {}
    #: SHA-256 of every train / val / test image file, the manifest and the resolved config (models.provenance).
    provenance: Optional[Provenance] = None
    #: Trust audits of the model, by name ("shortcuts", "backdoor"), as written by ``covidcxr audit``.
    audits: dict = {}
    integrity: Optional[Integrity] = None

    @field_validator("classes")
    @classmethod
    def _unique(cls, v):
        if len(set(v)) != len(v):
            raise ValueError(f"class names must be unique, got {v}")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v):
        if v is not None and not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"must be a probability in [0, 1], got {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self):
        if self.positive_class is not None and self.positive_class not in self.classes:
            raise ValueError(f"positive_class {self.positive_class!r} is not one of the classes {self.classes}")
        if not self.preprocess.resolved:
            raise ValueError("preprocess has no channels / mean / std (a run stores the resolved spec)")
        if self.architecture == "ensemble" and not self.members:
            raise ValueError("an ensemble lists its members")
        return self

    # ------------------------------------------------------------------ derived

    @property
    def channels(self) -> int:
        return int(self.preprocess.channels)

    @property
    def positive_index(self) -> int | None:
        return self.classes.index(self.positive_class) if self.positive_class in self.classes else None

    def decide(self, probs: np.ndarray) -> list[str]:
        """Predicted labels: the stored threshold on the positive class when there is one, else argmax."""
        probs = np.asarray(probs)
        if self.threshold is not None and self.positive_index is not None:
            pos = probs[:, self.positive_index] >= self.threshold
            rest = probs.copy()
            rest[:, self.positive_index] = -np.inf
            return [self.positive_class if p else self.classes[int(j)] for p, j in zip(pos, rest.argmax(1))]
        return [self.classes[int(j)] for j in probs.argmax(1)]


# ---------------------------------------------------------------------------- integrity


def _field_hashes(content: dict) -> dict[str, str]:
    """SHA-256 of each top-level field's canonical JSON (sorted keys, no spaces, NaN as null)."""
    return {k: hashlib.sha256(dumps_json(v, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            for k, v in sorted(content.items())}


def _overall(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def _hmac(record_sha256: str) -> str | None:
    key = os.environ.get(RUN_KEY_ENV)
    if not key:
        return None
    return hmac.new(key.encode(), record_sha256.encode(), hashlib.sha256).hexdigest()


def _content(record: BaseModel) -> dict:
    """The record as it is written (JSON types), without the integrity block."""
    return json.loads(dumps_json(record.model_dump(mode="json", exclude={"integrity"})))


def seal(record: BaseModel) -> BaseModel:
    """The record with its integrity block computed (only the record writers call this: :func:`write_run_record`
    and, for lung segmenters, :func:`covidcxr.models.segmenter.write_segmenter_record`)."""
    fields = _field_hashes(_content(record))
    overall = _overall(fields)
    return record.model_copy(update={"integrity": Integrity(fields=fields, record_sha256=overall,
                                                            hmac_sha256=_hmac(overall))})


def verify_integrity(content: dict, integrity: dict | None, where: str) -> None:
    """Refuse ``content`` (a parsed run.json without its integrity block) that changed since it was written."""
    if not integrity:
        raise WeightsError(f"{where}: has no integrity record; it was not written by covidcxr's run writer "
                           "(or the block was removed). Refusing to use it; re-train or re-export the run")
    fields = _field_hashes(content)
    stored = integrity.get("fields") or {}
    changed = sorted(k for k in set(fields) | set(stored) if fields.get(k) != stored.get(k))
    if changed or _overall(stored) != integrity.get("record_sha256"):
        what = ", ".join(changed) if changed else "the integrity block itself"
        raise WeightsError(f"{where}: changed since it was written ({what}); every model decision depends on "
                           "these fields, so the run is refused. Restore the original run.json or re-train")
    expected = _hmac(integrity["record_sha256"])
    if expected is not None:
        if not integrity.get("hmac_sha256"):
            raise WeightsError(f"{where}: {RUN_KEY_ENV} is set but the record carries no HMAC (it was written "
                               "without the key); refusing it")
        if not hmac.compare_digest(expected, integrity["hmac_sha256"]):
            raise WeightsError(f"{where}: HMAC does not match {RUN_KEY_ENV}: the record was written with another "
                               "key or forged; refusing it")


# ---------------------------------------------------------------------------- reading / writing


def write_run_record(run_dir: str | Path, record: BaseModel) -> BaseModel:
    """The one writer of ``run.json`` (classifier or segmenter record): seal it and write it atomically.
    Returns the sealed record."""
    sealed = seal(record)
    write_json(Path(run_dir) / RUN_JSON, sealed.model_dump(mode="json"))
    return sealed


def read_sealed_record(run_dir: str | Path, model: type[R], *, verify: bool, missing: str,
                       check_format: Callable[[Path, dict], None], what: str) -> R:
    """``RUN_DIR/run.json`` parsed, format-checked (``check_format`` raises), integrity-checked and
    validated as ``model``; every failure is a CovidCXRError naming the file."""
    path = Path(run_dir) / RUN_JSON
    if not path.is_file():
        raise CovidCXRError(f"{run_dir}: {missing}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CovidCXRError(f"{path}: not valid JSON ({exc})") from exc
    check_format(path, raw)
    if verify:
        verify_integrity({k: v for k, v in raw.items() if k != "integrity"}, raw.get("integrity"), str(path))
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise CovidCXRError(f"{path}: invalid {what} ({validation_problems(exc)})") from None


def _classifier_format(path: Path, raw) -> None:
    if not isinstance(raw, dict):
        raise CovidCXRError(f"{path}: not a run record (a JSON object is expected)")
    fmt = raw.get("format")
    if fmt == SEGMENTER_FORMAT:
        raise CovidCXRError(f"{path}: a lung segmenter run, not a classifier; use `covidcxr segment predict`")
    if fmt != RUN_FORMAT:
        raise CovidCXRError(f"{path}: run format {fmt!r}; this covidcxr reads {RUN_FORMAT!r}. Re-train the run "
                            "(format 1 records carry no integrity check and no working size)")


def read_run_record(run_dir: str | Path, *, verify: bool = True) -> RunRecord:
    """Read, validate and (by default) integrity-check ``RUN_DIR/run.json``."""
    return read_sealed_record(run_dir, RunRecord, verify=verify, check_format=_classifier_format, what="run record",
                              missing=f"not a covidcxr run directory (no {RUN_JSON}); train one with `covidcxr train`")


def update_run_record(run_dir: str | Path, **changes) -> RunRecord:
    """Change fields of ``run.json`` (e.g. ``onnx``, ``calibration``) through the one writer."""
    record = read_run_record(run_dir)
    try:
        updated = RunRecord.model_validate({**record.model_dump(exclude={"integrity"}), **changes})
    except ValidationError as exc:
        raise CovidCXRError(f"{run_dir}: invalid change to the run record ({exc.errors()[0]['msg']})") from None
    return write_run_record(run_dir, updated)
