"""The web service: ``create_app(run_dir, settings)`` -> FastAPI app with an API and a page.

Endpoints

* ``POST /v1/predict`` - multipart upload (field ``file``) of a PNG / JPEG / TIFF / BMP / DICOM chest
  X-ray -> class probabilities, label at the run's stored threshold, model id (SHA-256) and a
  Grad-CAM overlay (base64 PNGs: the image, the coloured heatmap, and both blended).
* ``GET /v1/model`` - model card (``RUN_DIR/MODEL_CARD.md``), classes, threshold, preprocessing and
  the validation metrics stored with the run.
* ``GET /healthz`` - liveness + model id. ``GET /`` - the page (``serving/static``). ``/docs`` - OpenAPI.

Safety rails: a request body limit (413 before the body is read when Content-Length says so),
content sniffing by :func:`covidcxr.data.decode_xray` (never the file name), a pixel limit, a
per-request timeout (504; inference runs in a thread pool), clear 4xx messages for bad input, an
optional API token (``Authorization: Bearer ...`` or ``X-API-Token``), and an audit row for every
prediction request (:mod:`covidcxr.serving.audit_log`; no pixels, no DICOM header fields).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, nullcontext
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from covidcxr.errors import ConfigError, ImageReadError, NotAChestXRayError

log = logging.getLogger("covidcxr.serving")

STATIC_DIR = Path(__file__).resolve().parent / "static"
MODEL_CARD_FILE = "MODEL_CARD.md"
DISCLAIMER = ("Research use, not a medical device. Outputs are not a diagnosis and must not be used "
              "for clinical decisions.")


class ServiceSettings(BaseModel):
    """Everything ``covidcxr serve`` can be told; validated (pydantic)."""

    backend: Literal["torch", "onnx"] = "torch"
    token: str | None = Field(None, description="API token; when set, /v1/* needs it")
    audit_db: str | None = Field(None, description="SQLAlchemy URL; default sqlite file RUN_DIR/audit.sqlite")
    max_upload_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_pixels: int = Field(40_000_000, gt=0, description="largest width x height decoded")
    timeout_s: float = Field(30.0, gt=0)
    heatmaps: bool = Field(True, description="compute Grad-CAM overlays (needs the PyTorch model)")
    workers: int = Field(2, ge=1, le=64, description="inference threads")
    allow_non_frontal: bool = False


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
        self.model_info = ModelInfo(sha256=self.run.model_sha256, architecture=self.run.record.architecture,
                                    backend=settings.backend, onnx_sha256=getattr(self.run, "onnx_sha256", None))
        self.started = time.time()

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.audit.close()

    def predict_bytes(self, data: bytes, filename: str | None, request_id: str, heatmap: bool) -> dict:
        from covidcxr.models.predict import predict_inputs, prepare_bytes
        from covidcxr.serving.heatmap import display_layers

        name = filename or "upload"
        try:  # decoded and preprocessed once: the prediction and the heatmap share this input
            prepared = prepare_bytes(data, name, self.run.spec, allow_non_frontal=self.settings.allow_non_frontal,
                                     max_pixels=self.settings.max_pixels)
        except NotAChestXRayError as exc:
            reason = f"not a frontal chest X-ray: {exc.reason}"
            raise HTTPError(422, f"{name}: {reason}", audit_message=reason) from None
        except ImageReadError as exc:
            raise HTTPError(422, f"{name}: {exc.reason}", audit_message=exc.reason) from None
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

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(
        title="covidcxr", version=__import__("covidcxr").__version__, lifespan=lifespan,
        description=f"Chest X-ray classifier `{service.model_info.architecture}` "
                    f"(model SHA-256 `{service.model_info.sha256}`). {DISCLAIMER}",
    )
    app.state.service = service
    bearer = HTTPBearer(auto_error=False, description="API token as `Authorization: Bearer <token>`")
    api_key = APIKeyHeader(name="X-API-Token", auto_error=False, description="API token")

    def audit(request_id: str, status: int, started: float, **fields) -> None:
        try:
            service.audit.record(request_id=request_id, endpoint="/v1/predict", model_sha256=service.model_info.sha256,
                                 backend=settings.backend, status_code=status,
                                 latency_ms=(time.perf_counter() - started) * 1000, **fields)
        except Exception:  # the audit database must not take the service down; say so loudly
            log.exception("audit log write failed for request %s", request_id)

    async def require_token(request: Request, cred: HTTPAuthorizationCredentials | None = Depends(bearer),
                            key: str | None = Depends(api_key)) -> None:
        if settings.token is None:
            return
        given = (cred.credentials if cred is not None else None) or key
        if given is None or not hmac.compare_digest(given.encode(), settings.token.encode()):
            if request.url.path == "/v1/predict":
                await run_in_threadpool(audit, str(uuid.uuid4()), 401, time.perf_counter(),
                                        error="missing or wrong API token")
            raise StarletteHTTPException(401, "missing or wrong API token: send `Authorization: Bearer <token>` "
                                              "or `X-API-Token: <token>`", headers={"WWW-Authenticate": "Bearer"})

    too_large = (f"upload too large: the limit is {settings.max_upload_bytes:,} bytes "
                 f"({settings.max_upload_bytes / 2**20:.1f} MiB)")

    @app.middleware("http")
    async def reject_large_uploads(request: Request, call_next):
        # Refuse by the declared Content-Length before a byte of the body is read. Bodies without
        # one (chunked) are cut off by the route's max_body_size while streaming, also with 413.
        declared = request.headers.get("content-length", "")
        if request.url.path == "/v1/predict" and declared.isdigit() and int(declared) > settings.max_upload_bytes:
            await run_in_threadpool(audit, str(uuid.uuid4()), 413, time.perf_counter(),
                                    error=f"{too_large} (declared {int(declared):,} bytes)")
            return JSONResponse({"detail": too_large}, status_code=413, headers={"Connection": "close"})
        return await call_next(request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = too_large if exc.status_code == 413 else exc.detail
        if exc.status_code == 413 and request.url.path == "/v1/predict":
            await run_in_threadpool(audit, str(uuid.uuid4()), 413, time.perf_counter(), error=detail)
        return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        if request.url.path == "/v1/predict":
            problems = f"send the image as multipart form field 'file' ({problems})"
            await run_in_threadpool(audit, str(uuid.uuid4()), 422, time.perf_counter(), error=problems)
        return JSONResponse({"detail": problems}, status_code=422)

    @app.post("/v1/predict", response_model=PredictResponse, dependencies=[Depends(require_token)],
              max_body_size=settings.max_upload_bytes,
              responses={401: {"description": "token missing or wrong"}, 413: {"description": "upload too large"},
                         422: {"description": "not a readable chest X-ray"}, 504: {"description": "timed out"}})
    async def predict(file: UploadFile = File(..., description="PNG / JPEG / TIFF / BMP / DICOM chest X-ray"),
                      heatmap: bool = Query(True, description="compute the Grad-CAM overlay")):
        started = time.perf_counter()
        request_id = str(uuid.uuid4())
        data = await file.read()
        digest = hashlib.sha256(data).hexdigest()
        fields = dict(input_sha256=digest, input_bytes=len(data))
        loop = asyncio.get_running_loop()
        try:
            result = await asyncio.wait_for(
                loop.run_in_executor(service.executor, service.predict_bytes, data, file.filename, request_id, heatmap),
                timeout=settings.timeout_s)
        except HTTPError as exc:
            await run_in_threadpool(audit, request_id, exc.status, started, error=exc.audit_message, **fields)
            return JSONResponse({"detail": exc.message, "request_id": request_id}, status_code=exc.status)
        except asyncio.TimeoutError:
            message = f"prediction took longer than {settings.timeout_s:g} s and was abandoned; try again later"
            await run_in_threadpool(audit, request_id, 504, started, error=message, **fields)
            return JSONResponse({"detail": message, "request_id": request_id}, status_code=504)
        except Exception as exc:  # keep serving; the user gets an id to quote, the log the traceback
            log.exception("prediction %s failed", request_id)
            message = f"internal error ({exc.__class__.__name__}); quote request id {request_id}"
            await run_in_threadpool(audit, request_id, 500, started, error=f"{exc.__class__.__name__}: {exc}", **fields)
            return JSONResponse({"detail": message, "request_id": request_id}, status_code=500)
        latency_ms = (time.perf_counter() - started) * 1000
        await run_in_threadpool(audit, request_id, 200, started, predicted=result["predicted"],
                                probabilities=result["probabilities"], threshold=result["threshold"], **fields)
        return PredictResponse(**result, input_sha256=digest, latency_ms=latency_ms)

    @app.get("/v1/model", dependencies=[Depends(require_token)])
    async def model_card():
        return service.model_card()

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok", "model_sha256": service.model_info.sha256, "backend": settings.backend,
                "uptime_s": round(time.time() - service.started, 1)}

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def serve_run(run_dir: str | Path, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
              **settings) -> None:
    """``covidcxr serve``: validate ``settings`` (:class:`ServiceSettings` fields), load the run, run uvicorn."""
    import uvicorn
    from pydantic import ValidationError

    try:
        parsed = ServiceSettings(**settings)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"serve settings: {problems}") from None
    uvicorn.run(create_app(run_dir, parsed), host=host, port=port, log_level=log_level)
