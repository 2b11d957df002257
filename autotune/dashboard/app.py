"""The dashboard's web app: read-only pages and a JSON API over one store.

`create_app(store)` builds a FastAPI app over a store opened read-only (`Store(url,
read_only=True)`: SQLite `mode=ro`, PostgreSQL read-only transactions). Every route is a GET
(any other method answers 405); pages are Jinja2 templates and charts are drawn in the browser
by `static/dashboard.js` with plotly.js, both served from the installed packages (`plotly`'s own
`plotly.min.js`): nothing is fetched from elsewhere, and the Content-Security-Policy says so.
Pages and `/api/` answer from the same builders (`autotune.dashboard.data`). An unknown study or
trial is a 404 (a page, or `{"detail": ...}` under `/api/`); a bad query parameter a 422 naming
it; FastAPI's `/docs` are off, its OpenAPI schema is at `/api/openapi.json`.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.gzip import GZipMiddleware

from autotune.config import KNOBS
from autotune.dashboard import data
from autotune.errors import ConfigError
from autotune.redact import mask_secrets
from storage import NotFoundError
from storage.engine import safe_url
from storage.records import PAGE_SORTS, TRIAL_STATUSES

HERE = FilePath(__file__).resolve().parent
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
REFRESH_S = 10  # a running campaign's pages reload this often
PAGE_SIZE = 50

# one of the names (the schema carries the rule, so a bad value is a 422 naming the parameter)
Sort = Annotated[str, Query(pattern=f"^({'|'.join(PAGE_SORTS + KNOBS)})$")]
Status = Annotated[str | None, Query(pattern=f"^({'|'.join(TRIAL_STATUSES)})$")]


@functools.cache
def plotly_js() -> bytes:
    """plotly.js from the installed `plotly` wheel (no CDN)."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs().encode()


T = TypeVar("T")


class _Versioned:
    """Values kept while nothing in the store changes (the counts of trials by status, per
    study, are the version): verdicts (advising re-reads every trial, too slow for each page
    view) and a study's chart points (every trial of a large study)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version: Any = None
        self._values: dict[str, Any] = {}

    def get(self, version: Any, key: str, build: Callable[[], T]) -> T:
        with self._lock:
            if version != self._version:
                self._version, self._values = version, {}
            if key in self._values:
                return self._values[key]  # type: ignore[no-any-return]
        value = build()
        with self._lock:
            if version == self._version:
                self._values[key] = value
        return value


class ApiError(BaseModel):
    """Every error under `/api/`: what was wrong, in one line (and the validation errors, for a
    bad query parameter)."""

    detail: str
    errors: list[dict[str, Any]] | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ApiError, "description": "No such study or trial"},
    422: {"model": ApiError, "description": "A query or path parameter is not valid (it is named)"},
    503: {"model": ApiError, "description": "The database could not be read"},
}


def create_app(store: Any) -> FastAPI:
    """The dashboard over `store` (open read-only; the app never closes it)."""
    app = FastAPI(
        responses=ERRORS,
        title="autotune dashboard",
        summary="Read-only: studies, trials, timelines and the BPipe verdict from the autotune store.",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url="/api/openapi.json",
    )
    app.add_middleware(GZipMiddleware, minimum_size=2048, compresslevel=1)  # level 9: 5x the time
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["num"] = _num
    templates.env.filters["bytes"] = _bytes
    templates.env.filters["pct"] = _pct
    storage = safe_url(store.url)
    verdicts = _Versioned()
    summaries = _Versioned()
    points = _Versioned()
    rows = data.StudyPoints(store)

    def version() -> Any:
        counts = store.status_counts()
        return tuple(sorted((k, tuple(sorted(v.items()))) for k, v in counts.items()))

    def verdict_of(name: str) -> dict[str, Any]:
        return verdicts.get(version(), name, lambda: data.verdict_summary(store, name))

    def advice_of(name: str) -> dict[str, Any]:
        return verdicts.get(version(), "advice:" + name, lambda: data.advice(store, name))

    def studies() -> dict[str, Any]:
        names = [s.name for s in store.studies()]
        advice = {n: verdict_of(n) for n in names}
        return summaries.get(version(), "studies", lambda: data.studies(store, advice=advice))

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Any]) -> Response:
        response: Response = await call_next(request)
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    def page(request: Request, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("refresh", None)
        return templates.TemplateResponse(
            request, template, {"storage": storage, **context}, status_code=status_code
        )

    def fail(request: Request, status_code: int, detail: str) -> Response:
        detail = mask_secrets(detail)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"detail": detail}, status_code=status_code)
        context = {"code": status_code, "detail": detail, "title": str(status_code)}
        return page(request, "error.html", status_code, **context)

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, exc: NotFoundError) -> Response:
        return fail(request, 404, str(exc.args[0] if exc.args else exc))

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, exc: ValueError) -> Response:
        return fail(request, 422, str(exc))

    @app.exception_handler(ConfigError)
    async def store_failed(request: Request, exc: ConfigError) -> Response:
        return fail(request, 503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, exc: RequestValidationError) -> Response:
        problems = [f"{_where(e['loc'])}: {e['msg']}" for e in exc.errors()]
        if request.url.path.startswith("/api/"):
            errors = [{"loc": [str(p) for p in e["loc"]], "msg": str(e["msg"]), "type": str(e["type"])}
                      for e in exc.errors()]  # fmt: skip
            return JSONResponse({"detail": "; ".join(problems), "errors": errors}, status_code=422)
        return fail(request, 422, "; ".join(problems))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        response = fail(request, exc.status_code, str(exc.detail))
        if exc.status_code == 405:
            response.headers["Allow"] = "GET, HEAD"
        return response

    # -- static --------------------------------------------------------------------------
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def plotly() -> Response:
        return Response(
            plotly_js(), media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"}
        )

    # -- JSON API ------------------------------------------------------------------------
    @app.get("/api/studies", summary="Every study: counts, best configuration, BPipe verdict")
    def api_studies() -> dict[str, Any]:
        return studies()

    @app.get("/api/studies/{name}", summary="One study, with every trial as a chart point",
             response_model=dict[str, Any])  # fmt: skip
    def api_study(name: str) -> Response:
        body = points.get(version(), name, lambda: JSONResponse(data.study(store, name, rows)).body)
        return Response(body, media_type="application/json")  # plain JSON: encoded once per version

    @app.get("/api/studies/{name}/trials", summary="A page of a study's trials, sorted and filtered",
             response_model=dict[str, Any])  # fmt: skip
    def api_trials(
        request: Request,
        name: str,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        limit: Annotated[int, Query(ge=1, le=data.MAX_PAGE)] = PAGE_SIZE,
        sort: Sort = "id",
        order: Literal["asc", "desc"] = "asc",
        status: Status = None,
        tp: Annotated[int | None, Query(ge=1, le=10**6)] = None,
        pp: Annotated[int | None, Query(ge=1, le=10**6)] = None,
        dp: Annotated[int | None, Query(ge=1, le=10**6)] = None,
        micro_batch_size: Annotated[int | None, Query(ge=1, le=10**6)] = None,
        schedule: Annotated[str | None, Query(max_length=32)] = None,
        recompute: Annotated[str | None, Query(max_length=32)] = None,
        flash_attention: bool | None = None,
    ) -> Response:
        knobs = {k: v for k, v in (("tp", tp), ("pp", pp), ("dp", dp), ("micro_batch_size", micro_batch_size),
                                   ("schedule", schedule), ("recompute", recompute),
                                   ("flash_attention", flash_attention)) if v is not None}  # fmt: skip
        page = data.trials(store, name, offset=offset, limit=limit, sort=sort, order=order, status=status,
                           knobs=knobs)  # fmt: skip
        return JSONResponse(page)

    @app.get("/api/studies/{name}/advice", summary="The BPipe verdict (autotune advise --json)")
    def api_advice(name: str) -> dict[str, Any]:
        return advice_of(name)

    @app.get("/api/trials/{trial_id}", summary="One trial: configuration, losses, per-stage memory")
    def api_trial(trial_id: Annotated[int, _TrialId]) -> dict[str, Any]:
        return data.trial(store, trial_id)

    @app.get("/api/trials/{trial_id}/timeline", summary="The trial's measured and simulated step (spans)")
    def api_timeline(trial_id: Annotated[int, _TrialId], format: Literal["spans", "chrome"] = "spans") -> Any:
        if format == "chrome":
            trace = data.chrome(store, trial_id)
            disposition = f'attachment; filename="trial-{trial_id}.trace.json"'
            return JSONResponse(trace, headers={"Content-Disposition": disposition})
        return data.timeline(store, trial_id)

    @app.get("/api/compare", summary="Two trials side by side (b defaults to a's BPipe/baseline counterpart)")
    def api_compare(
        a: Annotated[int, _TrialRef], b: Annotated[int | None, _TrialRef] = None
    ) -> dict[str, Any]:
        return data.compare(store, a, b)

    # -- pages ---------------------------------------------------------------------------
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def studies_page(request: Request) -> HTMLResponse:
        listing = studies()
        running = any(s["running"] for s in listing["studies"])
        return page(request, "studies.html", title="studies", listing=listing,
                    refresh=REFRESH_S if running else None)  # fmt: skip

    @app.get("/studies/{name}", response_class=HTMLResponse, include_in_schema=False)
    def study_page(
        request: Request,
        name: str,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        limit: Annotated[int, Query(ge=1, le=data.MAX_PAGE)] = PAGE_SIZE,
        sort: Sort = "id",
        order: Literal["asc", "desc"] = "asc",
        status: Status = None,
    ) -> HTMLResponse:
        record = store.study(name)
        if record is None:
            raise NotFoundError(f"no study {name!r}")
        filters = data.parse_filters(request.query_params)
        table = data.trials(store, name, offset=offset, limit=limit, sort=sort, order=order,
                            status=status, knobs=filters)  # fmt: skip
        summary = data.study_summary(store, record, store.status_counts().get(name, {}), None)
        return page(
            request, "study.html", title=name, name=name, summary=summary, table=table, filters=filters,
            status=status, knobs=KNOBS, statuses=TRIAL_STATUSES, sorts=PAGE_SORTS + KNOBS,
            refresh=REFRESH_S if summary["running"] else None,
            query=_query_string(request),
        )  # fmt: skip

    @app.get("/trials/{trial_id}", response_class=HTMLResponse, include_in_schema=False)
    def trial_page(request: Request, trial_id: Annotated[int, _TrialId]) -> HTMLResponse:
        detail = data.trial(store, trial_id)
        refresh = REFRESH_S if detail["status"] == "running" else None
        return page(request, "trial.html", title=f"trial {trial_id}", trial=detail, refresh=refresh)

    @app.get("/compare", response_class=HTMLResponse, include_in_schema=False)
    def compare_page(
        request: Request,
        a: Annotated[int, _TrialRef],
        b: Annotated[int | None, _TrialRef] = None,
    ) -> HTMLResponse:
        both = data.compare(store, a, b)
        title = f"trial {a} vs {both['b']['id']}"
        return page(request, "compare.html", title=title, a=both["a"], b=both["b"])

    return app


_TrialId = Path(ge=1, le=2**62)  # a trial id's bounds (SQL integers), in the path
_TrialRef = Query(ge=1, le=2**62)  # and in the query


def _where(loc: tuple[Any, ...] | list[Any]) -> str:
    """The parameter a validation error is about: `limit`, not `query.limit`."""
    return ".".join(str(p) for p in loc[1:]) or str(loc[0])


def _query_string(request: Request) -> dict[str, str]:
    return {k: v for k, v in request.query_params.items() if v != ""}


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) or abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _bytes(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:,.1f} {unit}" if unit != "B" else f"{value:,.0f} B"
        value /= 1024
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{value:+.0%}"
