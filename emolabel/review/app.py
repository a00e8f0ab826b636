"""The review page's web app (Starlette): the page, thumbnails by id, and verdicts as JSON.

    GET  /                  a job's labels as cards, most doubtful first, grouped by label;
                            filters: job, label, min/max confidence, model version, uncertain
    GET  /thumb/{image_id}  ?version=V[&face=N]: a JPEG of the image or face, read confined
    POST /api/reviews       {"reviews": [{"image_id", "model_version", "face_index", "label"}]}

Every request passes `ReviewAuth` first (see `emolabel.review.auth`). A verdict batch is written
whole or not at all: an id that names no stored label is 404, a label outside the model's classes
400, and nothing of the batch is stored either way.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from sqlalchemy.orm import Session, sessionmaker
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from core.errors import ImageError
from core.reasons import Reason
from core.settings import Settings
from core.storage.reader import Reader
from db import repository
from db.repository import ReviewError, ReviewFilters, ReviewInput, ReviewItem
from emolabel.review.auth import (
    COOKIE_NAME,
    SAFE_METHODS,
    Credentials,
    reviewer_of,
    same_secret,
    write_refusal,
)
from emolabel.review.facets import FacetsCache
from emolabel.review.ranking import group_by_label
from emolabel.review.thumbnails import ThumbnailCache, make_thumbnail

logger = logging.getLogger(__name__)

HERE = Path(__file__).parent
JOBS_LISTED = 50
MAX_VERDICTS = 1000
# Thumbnails of an image version never change (the key names its fingerprint), but they are
# private to whoever may log in.
THUMBNAIL_CACHE_CONTROL = "private, max-age=3600"


@dataclass
class ReviewContext:
    """What the app's handlers share."""

    settings: Settings
    sessions: sessionmaker[Session]
    credentials: Credentials
    reader: Reader
    thumbnails: ThumbnailCache
    facets: FacetsCache


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


class ReviewAuth(BaseHTTPMiddleware):
    """Logs in with the token URL, refuses the unauthenticated (401) and cross-site writes (403)."""

    def __init__(self, app: Any, credentials: Credentials) -> None:
        super().__init__(app)
        self.credentials = credentials

    async def dispatch(
        self, request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        token = request.query_params.get("token")
        if token is not None and request.method in SAFE_METHODS:
            if not same_secret(token, self.credentials.token):
                return self._challenge("wrong token")
            clean = request.url.remove_query_params("token")
            target = clean.path + (f"?{clean.query}" if clean.query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                COOKIE_NAME, self.credentials.token, httponly=True, samesite="strict", path="/"
            )
            return response
        reviewer = reviewer_of(request.headers, request.cookies, self.credentials)
        if reviewer is None:
            return self._challenge("log in with the URL `emolabel review` printed")
        own_origin = f"{request.url.scheme}://{request.headers.get('host', '')}"
        refusal = write_refusal(request.method, request.headers, own_origin, self.credentials)
        if refusal is not None:
            return error(403, f"refused: {refusal}")
        request.state.reviewer = reviewer
        return await call_next(request)

    @staticmethod
    def _challenge(message: str) -> JSONResponse:
        return error(401, message, **{"WWW-Authenticate": 'Basic realm="emolabel review"'})


def _optional_float(text: str | None) -> float | None:
    if text is None or not text.strip():
        return None
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is not a finite number")
    return value


def _optional_int(text: str | None) -> int | None:
    return int(text) if text is not None and text.strip() else None


def _card(item: ReviewItem, human: dict[tuple[int, int | None], Any]) -> dict[str, Any]:
    verdict = human.get((item.image_id, item.face_index))
    return {
        "item": item,
        "human_label": verdict.label if verdict else None,
        "reviewed_by": verdict.reviewer if verdict else None,
    }


def page(request: Request) -> Response:
    context: ReviewContext = request.app.state.context
    query = request.query_params
    try:
        job_id = _optional_int(query.get("job"))
        minimum = _optional_float(query.get("min"))
        maximum = _optional_float(query.get("max"))
        page_number = max(1, _optional_int(query.get("page")) or 1)
    except ValueError as problem:
        return error(400, f"bad filter: {problem}")
    label = query.get("label") or None
    version = query.get("version") or None
    uncertain_only = query.get("uncertain") in ("1", "on", "true")
    changed_from = query.get("changed") or None
    page_size = context.settings.review.page_size
    with context.sessions() as session:
        jobs = repository.latest_jobs(session=session, limit=JOBS_LISTED)
        if job_id is None and jobs:
            job_id = jobs[0].id
        values: dict[str, Any] = {
            "jobs": jobs,
            "job_id": job_id,
            "label": label,
            "version": version,
            "minimum": minimum,
            "maximum": maximum,
            "uncertain_only": uncertain_only,
            "changed_from": changed_from,
            "csrf_token": context.credentials.csrf_token,
            "reviewer": request.state.reviewer,
            "groups": [],
            "classes": {},
            "labels": [],
            "versions": [],
            "total": 0,
            "page": page_number,
            "pages": 1,
        }
        if job_id is not None:
            filters = ReviewFilters(
                job_id=job_id,
                label=label,
                min_confidence=minimum,
                max_confidence=maximum,
                model_version=version,
                uncertain_only=uncertain_only,
                changed_from=changed_from,
            )
            facets = context.facets.get(
                (job_id, version),
                lambda: repository.review_facets(
                    session=session, job_id=job_id, model_version=version
                ),
            )
            classes = repository.model_classes(session=session, versions=facets.versions)
            ranked = repository.ranked_review_items(
                session=session,
                filters=filters,
                facets=facets,
                classes=classes,
                offset=(page_number - 1) * page_size,
                limit=page_size,
            )
            shown = ranked.items
            human = (
                {
                    (verdict.image_id, verdict.face_index): verdict
                    for verdict in repository.human_labels(
                        session=session, image_ids=[item.image_id for item in shown]
                    )
                }
                if shown
                else {}
            )
            values |= {
                "groups": [
                    (name, [_card(item, human) for item in rows])
                    for name, rows in group_by_label(shown)
                ],
                "classes": classes,
                "labels": facets.labels,
                "versions": facets.versions,
                "total": ranked.total,
                "pages": max(1, math.ceil(ranked.total / page_size)),
            }
    templates: Jinja2Templates = request.app.state.templates
    return templates.TemplateResponse(request, "review.html", values)


def thumbnail(request: Request) -> Response:
    context: ReviewContext = request.app.state.context
    version = request.query_params.get("version")
    try:
        image_id = int(request.path_params["image_id"])
        face_index = _optional_int(request.query_params.get("face"))
    except ValueError:
        return error(400, "image id and face must be whole numbers")
    if not version:
        return error(400, "give the model version: /thumb/ID?version=V")
    with context.sessions() as session:
        source = repository.thumbnail_source(
            session=session, image_id=image_id, model_version=version, face_index=face_index
        )
    if source is None:
        what = f"image {image_id}" + (f" face {face_index}" if face_index is not None else "")
        return error(404, f"{what} has no label by model {version}")
    if source.job_root is None:
        return error(403, f"image {image_id}: its job is gone, so its root is unknown")
    size = context.settings.review.thumbnail_size
    limits = context.settings.limits
    job_root = source.job_root

    def make() -> bytes:
        return make_thumbnail(context.reader.read(source.uri, job_root), source.box, size, limits)

    try:
        body = context.thumbnails.get_or_make(
            (source.uri, source.fingerprint, source.box, size), make
        )
    except ImageError as problem:
        if problem.reason in (Reason.OUTSIDE_ROOT, Reason.SYMLINK_OUTSIDE_ROOT):
            return error(403, f"image {image_id} lies outside the allowed roots: not read")
        if problem.reason == Reason.MISSING:
            return error(404, f"image {image_id}: {problem}")
        return error(422, f"image {image_id} cannot be shown: {problem}")
    return Response(
        body, media_type="image/jpeg", headers={"Cache-Control": THUMBNAIL_CACHE_CONTROL}
    )


def _verdicts(body: Any, reviewer: str) -> list[ReviewInput]:
    """The verdicts of a request body; ValueError names what is wrong with it."""
    if not isinstance(body, dict) or not isinstance(body.get("reviews"), list):
        raise ValueError('send {"reviews": [{"image_id", "model_version", "face_index", "label"}]}')
    entries = body["reviews"]
    if not 0 < len(entries) <= MAX_VERDICTS:
        raise ValueError(f"send between 1 and {MAX_VERDICTS} verdicts")
    verdicts = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ValueError("each verdict is an object")
        image_id, face_index = entry.get("image_id"), entry.get("face_index")
        version, label = entry.get("model_version"), entry.get("label")
        if type(image_id) is not int or not (face_index is None or type(face_index) is int):
            raise ValueError("image_id must be an integer, face_index an integer or null")
        if not isinstance(version, str) or not isinstance(label, str):
            raise ValueError("model_version and label must be strings")
        verdicts.append(ReviewInput(image_id, version, label, reviewer, face_index=face_index))
    return verdicts


async def post_reviews(request: Request) -> Response:
    context: ReviewContext = request.app.state.context
    try:
        body = await request.json()
    except ValueError:
        return error(400, "the body is not JSON")
    try:
        verdicts = _verdicts(body, request.state.reviewer)
    except ValueError as problem:
        return error(400, str(problem))
    try:
        ids = await _record(context, verdicts)
    except LookupError as problem:
        return error(404, str(problem))
    except ReviewError as problem:
        return error(400, str(problem))
    return JSONResponse(
        {
            "saved": [
                {
                    "id": review_id,
                    "image_id": verdict.image_id,
                    "face_index": verdict.face_index,
                    "label": verdict.new_label,
                    "reviewer": verdict.reviewer,
                }
                for review_id, verdict in zip(ids, verdicts, strict=True)
            ]
        }
    )


async def _record(context: ReviewContext, verdicts: list[ReviewInput]) -> list[int]:
    return await run_in_threadpool(_record_now, context, verdicts)


def _record_now(context: ReviewContext, verdicts: list[ReviewInput]) -> list[int]:
    """Write the verdicts in one transaction; LookupError for an id naming no stored label."""
    with context.sessions() as session, session.begin():
        missing = repository.missing_items(
            session=session,
            keys=[(v.image_id, v.model_version, v.face_index) for v in verdicts],
        )
        if missing:
            image_id, version, face_index = missing[0]
            face = f" face {face_index}" if face_index is not None else ""
            raise LookupError(f"image {image_id}{face} has no label by model {version}")
        return repository.record_reviews(session=session, reviews=verdicts)


def make_app(
    settings: Settings, sessions: sessionmaker[Session], credentials: Credentials
) -> Starlette:
    """The review app; `credentials` are the secrets the command generated and printed."""
    context = ReviewContext(
        settings=settings,
        sessions=sessions,
        credentials=credentials,
        reader=Reader(
            max_file_bytes=settings.limits.max_file_bytes,
            allowed_roots=[os.fsencode(root) for root in settings.worker.allowed_roots],
            s3=settings.s3,
        ),
        thumbnails=ThumbnailCache(),
        facets=FacetsCache(settings.review.facets_seconds),
    )
    app = Starlette(
        routes=[
            Route("/", page, methods=["GET"]),
            Route("/thumb/{image_id}", thumbnail, methods=["GET"]),
            Route("/api/reviews", post_reviews, methods=["POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ],
        middleware=[Middleware(ReviewAuth, credentials=credentials)],
    )
    app.state.context = context
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True
    )
    app.state.templates = Jinja2Templates(env=environment)
    return app
