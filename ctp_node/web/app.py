"""The status page: an ASGI app (FastAPI), server-rendered HTML, no JavaScript, nothing fetched from outside.

Routes (all but ``/healthz`` behind ``ctp_node.web.auth``):
  GET  /healthz                     "ok" while the job store answers (for a load balancer or systemd)
  GET  /                            the job list, newest first (``?state=failed`` filters)
  GET  /jobs/{id}                   one job: timings, errors, deliveries, guardrail, derived series,
                                    QA figures, audit trail, actions
  GET  /jobs/{id}/figures/{name}    a PNG of the job's results folder (or of its result in the object store)
  POST /jobs/{id}/retry             process a failed, ignored or done series again
  POST /jobs/{id}/resend            send an existing result again (all or one destination)
  GET  /static/style.css            the page's only style sheet, shipped in the package
  GET  /static/favicon.svg          the page's icon (also answered at /favicon.ico)
and, with ``[dicomweb] stow_enabled``, the STOW-RS router of ``ctp_node.web.stow``.

Every GET is answered to HEAD as well, without the body. Errors are an HTML page for a browser (one
whose Accept header prefers text/html) and JSON (``{"detail": ...}``) for scripts and DICOMweb
clients. Actions are plain HTML forms, checked against cross-site forgery as ``ctp_node.web.auth``
says, and answered with a redirect back to the job (post/redirect/get). Every response forbids
framing and caching and allows no script (Content-Security-Policy): pages that change while a job
runs reload themselves with a meta refresh.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler, request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctp_node.config import Settings
from ctp_node.node.shared.audit import AuditLog
from ctp_node.node.shared.jobs import ERROR_HISTORY, JobStore
from ctp_node.node.shared.jobs_read import FINISHED_STATES, JobRow, State, StoreError
from ctp_node.node.shared.object_store import StoreUnavailable, is_uri
from ctp_node.web import jobview
from ctp_node.web.auth import Authenticator, CsrfTokens, Principal, Throttled, origin_allowed

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent
RETRYABLE = (State.FAILED, State.IGNORED, State.DONE)
RUNNING = (State.RECEIVING, State.QUEUED, State.PROCESSING, State.SENDING)
REFRESH_RUNNING_S = 5  # a job's page while it runs: progress moves (written at most every 5 s, progress.py)
REFRESH_LIST_S = 30  # the job list; 10 s while a job is processed (its progress column moves)
REFRESH_LIST_BUSY_S = 10
RESENDABLE = (State.DONE, State.FAILED)
MAX_FORM_BYTES = 16 * 1024
MAX_JOB_ID = 2**63 - 1  # job ids are 64-bit integers in the store: a larger one overflowed SQLite (HTTP 500)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
        "base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer a browser posts forms with "Origin: null".
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def wants_html(accept: str | None) -> bool:
    """True when an Accept header prefers HTML to JSON: a browser's navigation ("text/html,...;q=0.9,
    */*;q=0.8"), not curl's "*/*", a script's "application/json" or a DICOMweb client's types."""
    best = {"html": 0.0, "json": 0.0}
    for part in (accept or "").split(","):
        media, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if media in ("text/html", "application/xhtml+xml"):
            best["html"] = max(best["html"], quality)
        elif media in ("application/json", "application/problem+json") or media.endswith("+json"):
            best["json"] = max(best["json"], quality)
    return best["html"] > 0 and best["html"] >= best["json"]


ERROR_500_HTML = (
    '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>500 · ctp-node</title></head>'
    '<body><h1>500</h1><p>internal error; the node\'s log says why</p><p><a href="/">back to the job list</a>'
    "</p></body></html>"
)


class HeadAsGet:
    """Answers HEAD like GET, without the body (FastAPI's routes answer only the methods they name:
    HEAD was 405, issue 25). The headers, Content-Length included, are those of the GET."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return  # nothing of the body goes out; the last (empty) message ends the response
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every response (plain ASGI: request bodies stream through untouched),
    the answer to an unexpected error included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    if key not in headers:
                        headers[key] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            # Starlette answers an unhandled error outside every middleware: without this, a 500 went out
            # without the headers above (issue 23). The traceback goes to the log, not to the page.
            log.exception("status page: unexpected error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            accept = dict(scope.get("headers") or []).get(b"accept", b"").decode("latin-1")
            answer: Response = (
                HTMLResponse(ERROR_500_HTML, 500)  # a static page: the templates may be what failed
                if wants_html(accept)
                else PlainTextResponse("internal error; the node's log says why", 500)
            )
            await answer(scope, receive, send_with_headers)


def _fmt_time(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _fmt_epoch_time(value: float) -> str:
    """A ``time.time()`` value as the page's other times (UTC)."""
    return datetime.fromtimestamp(value, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "\u2013"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(round(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _fmt_dicom_date(value: str | None) -> str:
    """A DICOM DA (YYYYMMDD) as 2000-01-01; anything else (a legacy "2000.01.01", a damaged value) as it is."""
    text = (value or "").strip()
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text


def _fmt_dicom_time(value: str | None) -> str:
    """A DICOM TM (HHMMSS.FFFFFF, any tail may be missing) as 14:30:05; anything else as it is."""
    text = (value or "").strip()
    whole = text.split(".")[0]
    if not whole.isdigit() or len(whole) not in (2, 4, 6):
        return text
    return ":".join(whole[i : i + 2] for i in range(0, len(whole), 2)) + (":00" if len(whole) == 4 else "")


def _fmt_until(value: datetime | None, now: datetime | None = None) -> str:
    """How long until ``value``, roughly ("about 3 min"); "any moment" once it has passed."""
    if value is None:
        return ""
    now = now or datetime.now(timezone.utc)
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    left = (value - now).total_seconds()
    if left <= 5:
        return "any moment"
    return "about " + _fmt_seconds(left if left >= 60 else round(left))


def _fmt_bytes(value: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024  # type: ignore[assignment]
    return str(value)


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(PACKAGE / "templates"))
    templates.env.filters.update(
        time=_fmt_time,
        seconds=_fmt_seconds,
        size=_fmt_bytes,
        dicom_date=_fmt_dicom_date,
        dicom_time=_fmt_dicom_time,
        until=_fmt_until,
        epoch_time=_fmt_epoch_time,
    )
    return templates


def _stow_router(settings: Settings, receiver: Any) -> Any:
    """The STOW-RS router of ``ctp_node.web.stow`` when ``[dicomweb] stow_enabled`` (None otherwise)."""
    dicomweb = getattr(settings, "dicomweb", None)
    if not getattr(dicomweb, "stow_enabled", False):
        return None
    if receiver is None:
        raise RuntimeError("[dicomweb] stow_enabled needs the receiver: the status page runs inside `ctp-node serve`")
    try:
        from ctp_node.web.stow import stow_router
    except ModuleNotFoundError as exc:
        if exc.name != "ctp_node.web.stow":
            raise
        raise RuntimeError("[dicomweb] stow_enabled, but this installation has no STOW-RS endpoint") from exc
    return stow_router(receiver)


async def _form(request: Request) -> dict[str, str]:
    """An HTML form's fields (application/x-www-form-urlencoded, the only kind the page posts)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    body = await request.body()
    if not kind and not body:  # e.g. `curl -X POST` with a bearer token: an empty form
        return {}
    if kind != "application/x-www-form-urlencoded":
        raise HTTPException(415, "actions take an HTML form (application/x-www-form-urlencoded)")
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, "form too large")
    try:
        fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError as exc:
        raise HTTPException(400, "the form is not UTF-8") from exc
    return {key: values[-1] for key, values in fields.items()}


def create_app(
    settings: Settings,
    store: JobStore,
    *,
    receiver: Any = None,
    authenticator: Authenticator | None = None,
    audit: AuditLog | None = None,
) -> FastAPI:
    """The status page of the node configured by ``settings``, over ``store``.

    ``receiver`` (the running ``ctp_node.node.receive.receiver.Receiver``) is needed only for STOW-RS;
    ``authenticator`` defaults to the [web] section's secrets (``Authenticator.from_settings``).
    """
    web = settings.web
    auth = authenticator or Authenticator.from_settings(web)
    csrf = CsrfTokens()
    audit = audit or AuditLog(settings.storage.audit_log, store)
    jobs = store.read  # every page reads through the store's read side; ``store`` only for retry and resend
    headers_cache = jobview.HeaderCache(settings.storage.spool_dir, web.mask_patient)
    store_results = jobview.StoreResults(settings.storage)  # results in the object store, read by a job's page
    destinations = [d.name for d in settings.destinations]
    templates = _templates()

    app = FastAPI(title="ctp-node status", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(HeadAsGet)
    app.add_middleware(SecurityHeaders)  # added last: outermost, so HEAD answers carry the headers too

    @app.exception_handler(StarletteHTTPException)
    async def _error_page(request: Request, exc: StarletteHTTPException) -> Response:
        html_wanted = wants_html(request.headers.get("accept"))
        if exc.status_code == 401 and not html_wanted:  # a script: the challenge and a line
            return PlainTextResponse("authentication required", 401, headers=exc.headers)
        if not html_wanted:  # a script or a DICOMweb client: JSON
            return await http_exception_handler(request, exc)
        # A browser: a page (for 401, what it shows once its login dialog is cancelled), without the
        # user's name when none is signed in.
        return templates.TemplateResponse(
            request, "error.html", {"status": exc.status_code, "detail": exc.detail}, exc.status_code, exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError) -> Response:
        # e.g. /jobs/abc: FastAPI's raw list of pydantic errors, as JSON, was what a browser showed.
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
            for e in exc.errors()
        )
        if not wants_html(request.headers.get("accept")):
            return await request_validation_exception_handler(request, exc)  # FastAPI's own JSON
        return await _error_page(request, StarletteHTTPException(422, f"not a valid request: {problems}"))

    @app.exception_handler(StoreError)
    async def _store_down(request: Request, exc: StoreError) -> Response:
        log.error("status page: the job store does not answer: %s", exc)
        detail = "the job store does not answer; the node's log says why"
        return await _error_page(request, StarletteHTTPException(503, detail))

    def principal(request: Request) -> Principal:
        client = request.client.host if request.client else "?"
        try:
            found = auth.authenticate(request.headers.get("authorization"), client)
        except Throttled as exc:
            log.warning("status page: %s from %s locked out after failed logins", request.url.path, client)
            retry_after = str(max(math.ceil(exc.retry_after_s), 1))
            raise HTTPException(429, "too many failed logins; try again later", {"Retry-After": retry_after}) from None
        if found is None:
            if request.headers.get("authorization"):
                log.warning("status page: refused credentials from %s for %s", client, request.url.path)
            raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": auth.challenge()})
        return found

    def check_action(request: Request, who: Principal, form: dict[str, str]) -> None:
        if who.scheme == "bearer":  # never attached by a browser on its own: no forgery to fear
            return
        if not origin_allowed(request.headers.get("origin"), request.headers.get("host"), web.allowed_origins):
            log.warning("status page: refused an action posted from %s", request.headers.get("origin"))
            raise HTTPException(403, "this action was posted from another site; use the node's own page")
        if not csrf.valid(form.get("csrf"), who):
            raise HTTPException(403, "the form is stale or did not come from this page: reload the job and try again")

    def icon(_: Principal = Depends(principal)) -> Response:
        svg = resources.files("ctp_node.web").joinpath("static/favicon.svg").read_bytes()
        return Response(svg, media_type="image/svg+xml")

    # Linked from every page; /favicon.ico too, which browsers and tools ask for by name.
    app.get("/static/favicon.svg", name="favicon")(icon)
    app.get("/favicon.ico", include_in_schema=False)(icon)

    def job_or_404(job_id: int) -> JobRow:
        row = jobs.row(job_id) if 1 <= job_id <= MAX_JOB_ID else None
        if row is None:
            raise HTTPException(404, f"there is no job {job_id}; the job list shows the ones there are")
        return row

    # The receiver's back-pressure (ctp_node.node.shared.health): what it cannot keep instances without.
    health = getattr(receiver, "health", None)

    @app.get("/healthz", response_class=PlainTextResponse)
    def healthz() -> PlainTextResponse:
        try:
            jobs.counts()
        except Exception as exc:
            log.error("health check: the job store does not answer: %s", exc)
            return PlainTextResponse("job store unavailable", 503)
        down = [r.name for r in health.snapshot() if not r.available] if health is not None else []
        if down:  # a load balancer sends the scanners to another receiver meanwhile. Names only: this
            # answer needs no login, and the reasons name hosts and buckets (the job list shows them).
            return PlainTextResponse("refusing instances: " + ", ".join(down) + " unavailable", 503)
        return PlainTextResponse("ok")

    @app.get("/static/style.css", name="style")
    def style(_: Principal = Depends(principal)) -> Response:
        css = resources.files("ctp_node.web").joinpath("static/style.css").read_text(encoding="utf-8")
        return Response(css, media_type="text/css")

    @app.get("/", name="jobs")
    def job_list(request: Request, state: str = "", who: Principal = Depends(principal)) -> Response:
        try:
            states = [State(state)] if state else []
        except ValueError as exc:
            raise HTTPException(400, f"state must be one of {', '.join(s.value for s in State)}") from exc
        rows = jobs.rows(states, web.jobs_per_page)
        busy = any(row.job.state == State.PROCESSING for row in rows)
        context = {
            "refresh_s": REFRESH_LIST_BUSY_S if busy else REFRESH_LIST_S,
            "rows": rows,
            "headers": {row.job.id: headers_cache.get(row.job) for row in rows},
            "counts": jobs.counts(),
            "state": state,
            "states": [s.value for s in State],
            "limit": web.jobs_per_page,
            "user": who.name,
            "masked": web.mask_patient,
            "health": health.snapshot() if health is not None else [],
        }
        return templates.TemplateResponse(request, "jobs.html", context)

    def stored_result(job: Any) -> jobview.StoreResult | None:
        """The job's result in the object store (``result_dir`` an ``s3://`` address, no local folder)."""
        return store_results.get(job.result_dir) if is_uri(job.result_dir) else None

    @app.get("/jobs/{job_id}", name="job")
    def job_page(request: Request, job_id: int, done: str = "", who: Principal = Depends(principal)) -> Response:
        row = job_or_404(job_id)
        job = row.job
        stored = stored_result(job)
        folder: Path | jobview.StoreResult | None = stored if stored is not None else jobview.result_folder(job)
        trail = jobview.audit_trail(settings.storage.audit_log, job.series_uid)
        motion = jobview.motion_record(folder) if folder else None
        if stored is not None:  # the header of its result in the bucket
            from_store = lambda: stored.header(web.mask_patient)  # noqa: E731
        elif settings.storage.object_store is not None:  # no result yet: its series in the bucket's spool
            from_store = lambda: store_results.spool_header(job, web.mask_patient)  # noqa: E731
        else:
            from_store = None
        derived = jobview.derived_series(folder, web.mask_patient) if folder else []
        context = {
            "row": row,
            "job": job,
            "header": headers_cache.get(job, from_store),
            "stages": jobview.detailed_stages(row, trail),
            "attempts": jobview.processing_attempts(row, trail),
            "finished": job.state in FINISHED_STATES,
            "refresh_s": REFRESH_RUNNING_S if job.state in RUNNING else None,
            "trail": trail,
            "folder": stored.uri if stored is not None else folder,
            "derived": derived,
            "figures": jobview.figures(folder) if folder else [],
            "guardrail": jobview.guardrail_verdict(folder) if folder else None,
            "motion": motion,
            # Only the volumes realigned or not used: a table of every volume said nothing when none moved.
            "motion_rows": [v for v in (motion or {}).get("volumes", []) if v.get("corrected") or v.get("reasons")],
            "history_size": ERROR_HISTORY,
            "volumes": jobview.volumes_record(folder) if folder else None,
            "can_retry": job.state in RETRYABLE,
            "can_resend": job.state in RESENDABLE and job.result_dir is not None and bool(destinations),
            "destinations": destinations,
            "csrf": csrf.issue(who),
            "done": done,
            "user": who.name,
            "masked": web.mask_patient,
            # Read last: a store that stopped answering while the page was read is said too.
            "store_error": stored.error if stored is not None else None,
            "listing_limit": jobview.MAX_LISTED if stored is not None and stored.truncated else None,
        }
        return templates.TemplateResponse(request, "job.html", context)

    @app.get("/jobs/{job_id}/figures/{name:path}", name="figure")
    def figure(job_id: int, name: str, _: Principal = Depends(principal)) -> Response:
        job = job_or_404(job_id).job
        stored = stored_result(job)
        if stored is not None:  # the same check: only a name the result's listing holds
            if not stored.listed:  # the listing failed (its reason is ``error``)
                raise HTTPException(503, f"results in the object store could not be read: {stored.error}")
            if name not in jobview.figures(stored):
                raise HTTPException(404, f"job {job_id} has no figure {name!r}")
            try:
                return Response(stored.figure(name), media_type="image/png")
            except (StoreUnavailable, ValueError) as exc:
                raise HTTPException(503, f"results in the object store could not be read: {exc}") from exc
        folder = jobview.result_folder(job)
        # Served only when it is one of the figures listed for the job: no path reaches outside.
        if folder is None or name not in jobview.figures(folder):
            raise HTTPException(404, f"job {job_id} has no figure {name!r}")
        return FileResponse(folder / name, media_type="image/png")

    @app.post("/jobs/{job_id}/retry", name="retry")
    async def retry(request: Request, job_id: int, who: Principal = Depends(principal)) -> Response:
        form = await _form(request)
        check_action(request, who, form)
        row = await run_in_threadpool(job_or_404, job_id)
        if row.job.state not in RETRYABLE:
            raise HTTPException(
                409, f"job {job_id} is {row.job.state.value}: only failed, ignored or done jobs can be retried"
            )
        await run_in_threadpool(store.retry, job_id)
        await run_in_threadpool(
            audit.write, "retry", series_uid=row.job.series_uid, job=job_id, by=who.name, via="status page"
        )
        log.info("status page: %s queued job %d (%s) again", who.name, job_id, row.job.series_uid)
        return RedirectResponse(request.url_for("job", job_id=job_id).path + "?done=retry", 303)

    @app.post("/jobs/{job_id}/resend", name="resend")
    async def resend(request: Request, job_id: int, who: Principal = Depends(principal)) -> Response:
        form = await _form(request)
        check_action(request, who, form)
        row = await run_in_threadpool(job_or_404, job_id)
        chosen = form.get("destination", "")
        names = [chosen] if chosen else destinations
        if not names:
            raise HTTPException(409, "no destinations are configured: there is nowhere to send the result")
        if chosen and chosen not in destinations:
            raise HTTPException(400, f"unknown destination {chosen!r}; configured: {', '.join(destinations)}")
        if row.job.state not in RESENDABLE or row.job.result_dir is None:
            raise HTTPException(
                409, f"job {job_id} is {row.job.state.value} and has no result to send again: retry processes it"
            )
        try:
            await run_in_threadpool(store.resend, job_id, names)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from exc
        await run_in_threadpool(
            audit.write, "resend", series_uid=row.job.series_uid, job=job_id, destinations=names, by=who.name,
            via="status page",
        )  # fmt: skip
        log.info("status page: %s asked to send job %d again to %s", who.name, job_id, ", ".join(names))
        return RedirectResponse(request.url_for("job", job_id=job_id).path + "?done=resend", 303)

    stow = _stow_router(settings, receiver)
    if stow is not None:
        app.include_router(stow, dependencies=[Depends(principal)])
    return app
