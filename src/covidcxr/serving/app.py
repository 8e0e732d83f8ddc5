"""The web service: ``create_app(run_dir, settings)`` -> FastAPI app with an API and a page.

Endpoints

* ``POST /v1/predict`` - multipart upload (field ``file``) of a PNG / JPEG / TIFF / BMP / DICOM chest
  X-ray -> class probabilities, label at the run's stored threshold, model id (SHA-256) and a
  Grad-CAM overlay (base64 PNGs: the image, the coloured heatmap, and both blended).
* ``GET /v1/model`` - model card (``RUN_DIR/MODEL_CARD.md``), classes, threshold, preprocessing and
  the validation metrics stored with the run.
* ``GET /healthz`` - liveness (``{"status": "ok"}``; model id, backend and uptime only with the token
  or when no token is set). ``GET /`` - the static page (``serving/static``), which asks ``/v1/model``.
  ``/docs``, ``/redoc`` - OpenAPI pages, not served when a token is set; ``/openapi.json`` needs it.

Safety rails: the Host header must name this service (Starlette ``TrustedHostMiddleware``); the
front door :class:`covidcxr.serving.limits.ServiceGuard` refuses cross-site POSTs (403), requests
without the token (401, from the headers alone: the body is never read), too many uploads per
client / in total (429 / 503) and bodies slower than ``body_timeout_s`` (408); uvicorn runs with
header / keep-alive timeouts and connection caps (:mod:`covidcxr.serving.server`). Uploads are
decoded once by :func:`covidcxr.models.predict.prepare_bytes` in a bounded thread pool (503 with
Retry-After when the queue is full), with a pixel budget checked from the header and a decode time
budget (422), then a per-request timeout (504). Every request that reaches the endpoint writes an
audit row (:mod:`covidcxr.serving.audit_log`; no pixels, no DICOM header fields, no file name).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from covidcxr.errors import ConfigError, ImageReadError, NotAChestXRayError
from covidcxr.serving.limits import (RETRY_AFTER_S, TOKEN_HELP, RejectionLog, ServiceGuard, token_matches,
                                     too_large_message)
from covidcxr.serving.queue import BudgetExceeded, InferenceQueue, QueueTimeout
from covidcxr.serving.settings import ServiceSettings

__all__ = ["ServiceSettings", "create_app", "PredictionService"]

log = logging.getLogger("covidcxr.serving")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MODEL_CARD_FILE = "MODEL_CARD.md"
DISCLAIMER = ("Research use, not a medical device. Outputs are not a diagnosis and must not be used "
              "for clinical decisions.")


# ---------------------------------------------------------------------------- responses


class ModelInfo(BaseModel):
    sha256: str
    architecture: str
    backend: str
    onnx_sha256: str | None = None


class ImageInfo(BaseModel):
    format: str | None = None
    original_shape: list[int]
    width: int
    height: int
    image_png: str = Field(description="base64 PNG of the decoded X-ray, longer side <= 512")


class Heatmap(BaseModel):
    method: str
    target_class: str
    heatmap_png: str = Field(description="base64 PNG, colour-mapped heatmap (opaque; blend with an opacity)")
    overlay_png: str = Field(description="base64 PNG, X-ray with the heatmap blended at 40 %")


class PredictResponse(BaseModel):
    request_id: str
    filename: str | None
    input_sha256: str
    model: ModelInfo
    classes: list[str]
    probabilities: dict[str, float]
    predicted: str
    positive_class: str | None
    threshold: float | None
    image: ImageInfo
    heatmap: Heatmap | None
    latency_ms: float
    disclaimer: str = DISCLAIMER


class HTTPError(Exception):
    """A request that fails with ``status`` and a message for the user."""

    def __init__(self, status: int, message: str, audit_message: str | None = None):
        super().__init__(message)
        self.status, self.message = status, message
        # what the audit log keeps: the reason without the upload's file name, which hospitals often
        # make of patient names or ids
        self.audit_message = audit_message if audit_message is not None else message


# ---------------------------------------------------------------------------- the model side


class PredictionService:
    """Loads the run once; turns uploaded bytes into a :class:`PredictResponse` (thread-safe)."""

    def __init__(self, run_dir: str | Path, settings: ServiceSettings):
        from covidcxr.models.run import load_run
        from covidcxr.serving.audit_log import AuditLog, default_audit_url
        from covidcxr.serving.onnx import open_run

        self.run_dir = Path(run_dir)
        self.settings = settings
        self.run = open_run(self.run_dir, settings.backend)
        self.cam = None
        if settings.heatmaps:
            from covidcxr.serving.heatmap import CamRenderer

            self.cam = CamRenderer(self.run if settings.backend == "torch" else load_run(self.run_dir))
        # Grad-CAM hooks the PyTorch model; a plain forward pass on the same model must wait for it.
        self._model_lock = self.cam.lock if (self.cam is not None and self.cam.run is self.run) else None
        self.audit = AuditLog(settings.audit_db or default_audit_url(self.run_dir))
        self.executor = ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="covidcxr-infer")
        self.queue = InferenceQueue(self.executor, settings.workers + settings.max_queue)
        self.model_info = ModelInfo(sha256=self.run.model_sha256, architecture=self.run.record.architecture,
                                    backend=settings.backend, onnx_sha256=getattr(self.run, "onnx_sha256", None))
        self.started = time.time()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.audit.close()

    def prepare(self, data: bytes, filename: str | None):
        """Decode + preprocess once (the prediction and the heatmap share it); bad input -> HTTPError 422.

        The message names the file for the user; the audit keeps the error class and the reason, both
        scrubbed of the file name and of anything copied from the upload."""
        from covidcxr.models.predict import prepare_bytes
        from covidcxr.serving.audit_log import scrub_reason

        name = filename or "upload"
        try:
            return prepare_bytes(data, name, self.run.spec, lung_finder=self.run.lung_finder,
                                 allow_non_frontal=self.settings.allow_non_frontal,
                                 max_pixels=self.settings.max_pixels, checks=self.settings.input_checks())
        except ImageReadError as exc:
            prefix = "not a frontal chest X-ray: " if isinstance(exc, NotAChestXRayError) else ""
            shown = exc.reason  # the uploader's own file and content: told in full
            stored = scrub_reason(exc.reason, data, filename)
            raise HTTPError(422, f"{name}: {prefix}{shown}",
                            audit_message=f"{exc.__class__.__name__}: {prefix}{stored}") from None

    def infer(self, prepared, filename: str | None, request_id: str, heatmap: bool) -> dict:
        from covidcxr.models.predict import predict_inputs
        from covidcxr.serving.heatmap import display_layers

        with self._model_lock or nullcontext():
            (record,) = predict_inputs(self.run, [prepared])
        heat = self.cam.heatmaps([prepared])[0] if (heatmap and self.cam is not None) else None
        layers = display_layers(prepared.pixels, heat)
        h, w = prepared.original_shape
        return dict(
            request_id=request_id, filename=filename, model=self.model_info, classes=self.run.classes,
            probabilities={c: float(p) for c, p in zip(self.run.classes, record.probabilities)},
            predicted=record.predicted, positive_class=self.run.positive_class, threshold=self.run.threshold,
            image=ImageInfo(format=prepared.meta.get("format"), original_shape=[int(h), int(w)],
                            width=layers["width"], height=layers["height"], image_png=layers["image_png"]),
            heatmap=Heatmap(method=self.cam.method, target_class=self.cam.target_class(),
                            heatmap_png=layers["heatmap_png"], overlay_png=layers["overlay_png"])
            if heat is not None else None,
        )

    def predict_bytes(self, data: bytes, filename: str | None, request_id: str, heatmap: bool) -> dict:
        """Both stages in the calling thread (no budgets): for scripts and tests."""
        return self.infer(self.prepare(data, filename), filename, request_id, heatmap)

    def model_card(self) -> dict:
        card = self.run_dir / MODEL_CARD_FILE
        record = self.run.record
        return {
            "model": self.model_info.model_dump(),
            "classes": self.run.classes,
            "positive_class": self.run.positive_class,
            "threshold": self.run.threshold,
            "preprocess": self.run.spec.to_dict(),
            "model_card": card.read_text(encoding="utf-8") if card.is_file() else None,
            "metrics": run_metrics(self.run_dir, record.info),
            "disclaimer": DISCLAIMER,
        }


#: ``run.json["info"]`` entries that describe validation (the page shows these; the rest is provenance).
VALIDATION_INFO_KEYS = ("selection", "val_metrics", "threshold")


def run_metrics(run_dir: Path, info: dict) -> dict:
    """Validation metrics stored with a run.

    ``run.json`` info (checkpoint selection, validation metrics, threshold choice); without those,
    the last ``metrics.jsonl`` line; plus ``eval/*/metrics.json`` written by ``covidcxr evaluate``
    (named by their folder, e.g. an external test set).
    """
    metrics: dict = {k: info[k] for k in VALIDATION_INFO_KEYS if k in info}
    log_file = run_dir / "metrics.jsonl"
    if not metrics and log_file.is_file():
        lines = [ln for ln in log_file.read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            metrics["last_epoch"] = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            metrics["last_epoch"] = None
    if not metrics:
        metrics["info"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}
    evaluations = {}
    for path in sorted((run_dir / "eval").glob("*/metrics.json")):
        try:
            evaluations[path.parent.name] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            continue
    if evaluations:
        metrics["evaluations"] = evaluations
    return metrics


# ---------------------------------------------------------------------------- the HTTP side


def create_app(run_dir: str | Path, settings: ServiceSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``run_dir``'s model (loaded and SHA-256 checked here, before serving)."""
    settings = settings or ServiceSettings()
    if settings.token is not None and not settings.token.strip():
        raise ConfigError("token: must not be empty (leave it unset to serve without a token)")
    service = PredictionService(run_dir, settings)
    rejections = RejectionLog()

    @asynccontextmanager
    async def lifespan(app):
        yield
        rejections.flush()
        service.close()

    docs = settings.token is None  # the OpenAPI pages cannot send a token: not served when one is set
    app = FastAPI(title="covidcxr", version=__import__("covidcxr").__version__, lifespan=lifespan,
                  description=f"Chest X-ray classifier; the model is described by GET /v1/model. {DISCLAIMER}",
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None)
    app.state.service = service
    app.state.rejections = rejections
    bearer = HTTPBearer(auto_error=False, description="API token as `Authorization: Bearer <token>`")
    api_key = APIKeyHeader(name="X-API-Token", auto_error=False, description="API token")

    def audit(request_id: str, status: int, started: float, **fields) -> None:
        try:
            service.audit.record(request_id=request_id, endpoint="/v1/predict", model_sha256=service.model_info.sha256,
                                 backend=settings.backend, status_code=status,
                                 latency_ms=(time.perf_counter() - started) * 1000, **fields)
        except Exception:  # the audit database must not take the service down; say so loudly
            log.exception("audit log write failed for request %s", request_id)

    async def require_token(request: Request, _cred=Depends(bearer), _key=Depends(api_key)) -> None:
        # ServiceGuard has refused the request from its headers already; this documents the scheme
        # in the OpenAPI schema and checks once more.
        if not token_matches(request.headers, settings.token):
            raise StarletteHTTPException(401, TOKEN_HELP, headers={"WWW-Authenticate": "Bearer"})

    too_large = too_large_message(settings.max_upload_bytes)

    async def on_too_large(declared: int) -> None:
        await run_in_threadpool(audit, str(uuid.uuid4()), 413, time.perf_counter(),
                                error=f"{too_large} (declared {declared:,} bytes)")

    app.add_middleware(ServiceGuard, settings=settings, queue_full=service.queue.full, on_too_large=on_too_large,
                       rejections=rejections)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=settings.hosts(), www_redirect=False)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = too_large if exc.status_code == 413 else exc.detail
        if exc.status_code == 413 and request.url.path == "/v1/predict":  # a chunked body over the limit
            await run_in_threadpool(audit, str(uuid.uuid4()), 413, time.perf_counter(), error=detail)
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        if request.url.path == "/v1/predict":
            problems = f"send the image as multipart form field 'file' ({problems})"
            await run_in_threadpool(audit, str(uuid.uuid4()), 422, time.perf_counter(), error=problems)
        return JSONResponse({"detail": problems}, status_code=422)

    def fail(request_id: str, status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"detail": message, "request_id": request_id}, status_code=status, headers=headers)

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=[Depends(require_token)],
              max_body_size=settings.max_upload_bytes,
              responses={401: {"description": "token missing or wrong"}, 403: {"description": "cross-site request"},
                         408: {"description": "body too slow"}, 413: {"description": "upload too large"},
                         422: {"description": "not a readable chest X-ray"}, 429: {"description": "too many uploads"},
                         503: {"description": "busy: retry later"}, 504: {"description": "timed out"}})
    async def predict(file: UploadFile = File(..., description="PNG / JPEG / TIFF / BMP / DICOM chest X-ray"),
                      heatmap: bool = Query(True, description="compute the Grad-CAM overlay")):
        started = time.perf_counter()
        request_id = str(uuid.uuid4())
        data = await file.read()
        digest = hashlib.sha256(data).hexdigest()
        fields = dict(input_sha256=digest, input_bytes=len(data))
        slot = service.queue.admit()
        if slot is None:
            message = f"the service is busy ({service.queue.limit} predictions queued); try again in {RETRY_AFTER_S} s"
            await run_in_threadpool(audit, request_id, 503, started, error="inference queue full", **fields)
            return fail(request_id, 503, message, {"Retry-After": str(RETRY_AFTER_S)})
        loop = asyncio.get_running_loop()
        deadline = loop.time() + settings.timeout_s
        try:
            prepared = await slot.run(service.prepare, data, file.filename, deadline=deadline,
                                      budget=settings.decode_timeout_s)
            result = await slot.run(service.infer, prepared, file.filename, request_id, heatmap, deadline=deadline)
        except HTTPError as exc:
            await run_in_threadpool(audit, request_id, exc.status, started, error=exc.audit_message, **fields)
            return fail(request_id, exc.status, exc.message)
        except BudgetExceeded:
            reason = (f"decoding took longer than {settings.decode_timeout_s:g} s (the decode budget) and was "
                      "abandoned; the image is too large or too complex for this service")
            await run_in_threadpool(audit, request_id, 422, started, error=f"DecodeBudget: {reason}", **fields)
            return fail(request_id, 422, f"{file.filename or 'upload'}: {reason}")
        except QueueTimeout:
            message = f"prediction took longer than {settings.timeout_s:g} s and was abandoned; try again later"
            await run_in_threadpool(audit, request_id, 504, started, error=message, **fields)
            return fail(request_id, 504, message)
        except Exception as exc:  # keep serving; the user gets an id to quote, the log the traceback
            from covidcxr.serving.audit_log import scrub_reason

            log.exception("prediction %s failed", request_id)
            message = f"internal error ({exc.__class__.__name__}); quote request id {request_id}"
            stored = f"{exc.__class__.__name__}: {scrub_reason(str(exc), data, file.filename)}"
            await run_in_threadpool(audit, request_id, 500, started, error=stored, **fields)
            return fail(request_id, 500, message)
        finally:
            slot.close()
        latency_ms = (time.perf_counter() - started) * 1000
        await run_in_threadpool(audit, request_id, 200, started, predicted=result["predicted"],
                                probabilities=result["probabilities"], threshold=result["threshold"], **fields)
        return PredictResponse(**result, input_sha256=digest, latency_ms=latency_ms)

    @app.get("/v1/model", dependencies=[Depends(require_token)])
    async def model_card():
        return service.model_card()

    @app.get("/healthz")
    async def healthz(request: Request):
        if not token_matches(request.headers, settings.token):
            return {"status": "ok"}  # liveness for anyone; what is served only for the token holder
        return {"status": "ok", "model_sha256": service.model_info.sha256, "backend": settings.backend,
                "uptime_s": round(time.time() - service.started, 1),
                "queue": {"admitted": service.queue.admitted, "limit": service.queue.limit}}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
