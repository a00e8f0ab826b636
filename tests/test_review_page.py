"""The review page over HTTP (Starlette's TestClient on the real app, the real ledger on SQLite and
PostgreSQL, real JPEGs): never open without credentials, writes only with the page's CSRF token
from its own origin, bad ids and labels refused with a clear error and nothing written,
thumbnails only from the confined roots; and `export` carries the human label."""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.testclient import TestClient

from core.settings import Settings
from db.models import Review
from emolabel.review.app import make_app
from emolabel.review.auth import COOKIE_NAME, Credentials
from tests.support.cli import cli
from tests.support.review import (
    FACE_VERSION,
    VERSION,
    ReviewLedger,
    build_review_ledger,
    mark_uncertain,
)

COUNT = 8


@dataclass
class Page:
    client: TestClient
    sessions: sessionmaker[Session]
    ledger: ReviewLedger
    credentials: Credentials
    settings: Settings

    def reviews(self) -> int:
        with self.sessions() as session:
            return int(session.scalar(select(func.count()).select_from(Review)) or 0)

    def post(self, reviews: list[dict[str, object]], **headers: str) -> object:
        sent = {"X-CSRF-Token": self.credentials.csrf_token, **headers}
        return self.client.post("/api/reviews", json={"reviews": reviews}, headers=sent)


def _url(sessions: sessionmaker[Session]) -> str:
    return str(sessions.kw["bind"].url.render_as_string(hide_password=False))


@pytest.fixture
def page(ledger_sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[Page]:
    with ledger_sessions.begin() as session:
        ledger = build_review_ledger(session, tmp_path, COUNT)
    settings = Settings(
        home=tmp_path / "home",
        models_dir=tmp_path / "models",
        database_url=_url(ledger_sessions),
        worker={"allowed_roots": [tmp_path / "archive"]},
        flower={"user": "ann", "password": "correct-horse"},
        review={"thumbnail_size": 48},
    )
    credentials = Credentials.generate("bob", basic_user="ann", basic_password="correct-horse")
    app = make_app(settings, ledger_sessions, credentials)
    with TestClient(app, base_url="http://127.0.0.1:8765") as client:
        yield Page(client, ledger_sessions, ledger, credentials, settings)


def log_in(page: Page) -> None:
    response = page.client.get(f"/?token={page.credentials.token}", follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/"
    cookie = response.headers["set-cookie"]
    assert f"{COOKIE_NAME}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie


def verdict(image_id: int, label: str, face: int | None = None, version: str = VERSION) -> dict:
    return {"image_id": image_id, "model_version": version, "face_index": face, "label": label}


def test_nothing_is_open_without_credentials(page: Page) -> None:
    first = page.ledger.image_ids[0]
    for response in (
        page.client.get("/"),
        page.client.get(f"/thumb/{first}?version={VERSION}"),
        page.client.get("/static/review.js"),
        page.client.get("/?token=not-the-token"),
        page.post([verdict(first, "sad")]),
        page.client.get("/", auth=("ann", "wrong-password")),
    ):
        assert response.status_code == 401, response.text
        assert response.headers["www-authenticate"].startswith("Basic")
    assert page.reviews() == 0


def test_basic_auth_reviews_as_the_flower_user(page: Page) -> None:
    response = page.client.get("/", auth=("ann", "correct-horse"))
    assert response.status_code == 200 and "reviewing as <b>ann</b>" in response.text
    first = page.ledger.image_ids[0]
    saved = page.client.post(
        "/api/reviews",
        json={"reviews": [verdict(first, "sad")]},
        headers={"X-CSRF-Token": page.credentials.csrf_token},
        auth=("ann", "correct-horse"),
    )
    assert saved.status_code == 200, saved.text
    assert saved.json()["saved"][0]["reviewer"] == "ann"


def test_the_token_url_logs_in_and_the_page_lists_the_job_most_doubtful_first(page: Page) -> None:
    with page.sessions.begin() as session:
        mark_uncertain(session, page.ledger.image_ids[5:7], runner_up="sad")
    log_in(page)
    response = page.client.get("/")
    assert response.status_code == 200
    text = response.text
    assert f'<meta name="csrf-token" content="{page.credentials.csrf_token}">' in text
    assert "reviewing as <b>bob</b>" in text
    # Every label of the job: the images (the one outside the roots too: only its thumbnail is
    # refused) and the two faces.
    assert text.count("<article") == COUNT + 1 + 2
    first_cards = text.split('data-image-id="')[1:3]
    assert {card.split('"')[0] for card in first_cards} == {
        str(image_id) for image_id in page.ledger.image_ids[5:7]
    }
    assert "runner-up sad 0.300" in text and "uncertain</span>" in text

    only_uncertain = page.client.get(f"/?job={page.ledger.job_id}&uncertain=1")
    assert only_uncertain.text.count("<article") == 2
    faces = page.client.get(f"/?version={FACE_VERSION}")
    assert faces.text.count("<article") == 2 and "&amp;face=1" in faces.text
    low = page.client.get("/?max=0.5")
    assert 0 < low.text.count("<article") < COUNT + 3
    assert page.client.get("/?min=abc").status_code == 400


def test_a_write_needs_the_pages_token_and_origin(page: Page) -> None:
    log_in(page)
    first = page.ledger.image_ids[0]
    no_token = page.client.post("/api/reviews", json={"reviews": [verdict(first, "sad")]})
    assert no_token.status_code == 403 and "X-CSRF-Token" in no_token.json()["error"]
    wrong = page.post([verdict(first, "sad")], **{"X-CSRF-Token": "guess"})
    assert wrong.status_code == 403
    foreign = page.post([verdict(first, "sad")], Origin="http://evil.example")
    assert foreign.status_code == 403 and "origin" in foreign.json()["error"]
    assert page.reviews() == 0
    own = page.post([verdict(first, "sad")], Origin="http://127.0.0.1:8765")
    assert own.status_code == 200, own.text
    assert page.reviews() == 1


def test_bad_ids_and_labels_are_refused_and_nothing_is_written(page: Page) -> None:
    log_in(page)
    first, second = page.ledger.image_ids[:2]
    cases = [
        ([verdict(first, "sad"), verdict(second, "bored")], 400, "'bored' is not a class"),
        ([verdict(first, "sad"), verdict(987_654, "sad")], 404, "image 987654 has no label"),
        (
            [verdict(page.ledger.face_image_id, "happy", face=7, version=FACE_VERSION)],
            404,
            "face 7",
        ),
        ([verdict(first, "sad", version="no-such-model")], 404, "no-such-model"),
        ([{"image_id": "1; DROP TABLE", "model_version": VERSION, "label": "sad"}], 400, "integer"),
        ([], 400, "between 1 and"),
    ]
    for reviews, status, message in cases:
        response = page.post(reviews)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
    not_json = page.client.post(
        "/api/reviews", content=b"{", headers={"X-CSRF-Token": page.credentials.csrf_token}
    )
    assert not_json.status_code == 400
    assert page.reviews() == 0

    face = page.post([verdict(page.ledger.face_image_id, "angry", face=1, version=FACE_VERSION)])
    assert face.status_code == 200 and page.reviews() == 1


def decode(body: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(body, dtype=np.uint8), cv2.IMREAD_COLOR)
    assert image is not None
    return image


def test_thumbnails_come_from_the_roots_only(page: Page) -> None:
    log_in(page)
    first = page.ledger.image_ids[0]
    response = page.client.get(f"/thumb/{first}?version={VERSION}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert "max-age" in response.headers["cache-control"]
    assert decode(response.content).shape[:2] == (36, 48)  # 96x72 fitted into 48, aspect kept

    # A face: its 60x60 box with a quarter on each side, fitted into 48.
    face = page.client.get(f"/thumb/{page.ledger.face_image_id}?version={FACE_VERSION}&face=1")
    assert face.status_code == 200 and decode(face.content).shape[:2] == (48, 48)

    outside = page.client.get(f"/thumb/{page.ledger.outside_id}?version={VERSION}")
    assert outside.status_code == 403 and "outside the allowed roots" in outside.json()["error"]
    for address, status in [
        (f"/thumb/987654?version={VERSION}", 404),
        (f"/thumb/{first}?version=other", 404),
        (f"/thumb/{page.ledger.face_image_id}?version={FACE_VERSION}&face=9", 404),
        (f"/thumb/{first}", 400),
        (f"/thumb/{first}?version={VERSION}&face=x", 400),
    ]:
        response = page.client.get(address)
        assert response.status_code == status, (address, response.text)
        assert response.json()["error"]


def test_export_carries_the_human_label_and_its_provenance(page: Page) -> None:
    first, second = page.ledger.image_ids[:2]
    with page.sessions.begin() as session:
        mark_uncertain(session, [second], runner_up="angry")
    log_in(page)
    assert page.post([verdict(first, "angry")]).status_code == 200
    assert page.post([verdict(first, "sad")]).status_code == 200  # the latest verdict counts
    assert (
        page.post([verdict(page.ledger.face_image_id, "happy", face=0, version=FACE_VERSION)])
    ).status_code == 200

    exported = cli(page.settings, "export", "--model-version", VERSION).stdout
    rows = {row["uri"].rsplit("/", 1)[-1]: row for row in csv.DictReader(io.StringIO(exported))}
    assert (rows["000.jpg"]["human_label"], rows["000.jpg"]["reviewed_by"]) == ("sad", "bob")
    assert rows["000.jpg"]["reviewed_at"] and rows["000.jpg"]["outcome"] == "labeled"
    assert (rows["001.jpg"]["outcome"], rows["001.jpg"]["runner_up"]) == ("uncertain", "angry")
    assert rows["001.jpg"]["runner_up_confidence"] == "0.300000"
    assert rows["001.jpg"]["human_label"] == ""

    faces = cli(page.settings, "export", "--model-version", FACE_VERSION).stdout
    face_rows = list(csv.DictReader(io.StringIO(faces)))
    assert [(row["face_index"], row["human_label"]) for row in face_rows] == [
        ("0", "happy"),
        ("1", ""),
    ]


def test_basic_header_garbage_is_not_a_login(page: Page) -> None:
    for header in ("Basic !!!", "Bearer x", "Basic " + base64.b64encode(b"ann").decode()):
        assert page.client.get("/", headers={"Authorization": header}).status_code == 401
