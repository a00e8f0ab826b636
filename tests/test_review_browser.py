"""The review page in a real headless Chromium (Debian's `chromium` and `chromedriver`, nothing
downloaded): the real `emolabel review` process on a real SQLite ledger of real JPEGs; log in
through the printed token URL, thumbnails load, 5 labels corrected by clicks and 5 by keyboard
land in the `reviews` table, then a selection of two gets one label from the selection bar; a
screenshot is kept in test-artifacts/review_page.png.

Skipped only where Chromium is missing and this is not CI; in CI it must run.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings
from db.models import Review
from db.session import make_engine, make_sessionmaker, upgrade
from emolabel.embedded import worker_environment
from tests.support.paths import REPO
from tests.support.review import (
    CLASSES,
    VERSION,
    ReviewLedger,
    build_review_ledger,
    mark_uncertain,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO / "test-artifacts"
COUNT = 14
# Generous bounds on waiting for a process or a page: a loaded CI machine is slow, and nothing
# here measures time.
WAIT = 60.0

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()) and not os.environ.get("CI"),
        reason="Debian's chromium and chromium-driver are not installed (scripts/setup installs "
        "them); CI always runs this test",
    ),
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[tuple[sessionmaker[Session], ReviewLedger, Settings]]:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        built = build_review_ledger(session, tmp_path, COUNT)
        mark_uncertain(session, built.image_ids[:2], runner_up="happy")
    settings = Settings(
        home=tmp_path / "home",
        models_dir=tmp_path / "models",
        database_url=url,
        worker={"allowed_roots": [tmp_path]},
    )
    yield sessions, built, settings
    engine.dispose()


@pytest.fixture
def review_url(ledger: tuple[sessionmaker[Session], ReviewLedger, Settings]) -> Iterator[str]:
    """The token URL the real `emolabel review` prints."""
    settings = ledger[2]
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "emolabel", "review", "--port", str(port), "--reviewer", "carol"],
        env=worker_environment(settings, {"COLUMNS": "400"}),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.search(r"http://\S+/\?token=\S+", line)
        assert found, f"no URL printed: {line!r}"

        def listening() -> bool:
            assert process.poll() is None, "emolabel review exited"
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, "the review page to listen")
        yield found.group(0)
    finally:
        process.terminate()
        process.wait(timeout=WAIT)


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    # Selenium Manager must never download a browser or driver.
    monkeypatch.setenv("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def other_class(label: str, step: int = 1) -> str:
    return CLASSES[(CLASSES.index(label) + step) % len(CLASSES)]


def test_corrections_by_mouse_and_keyboard_land_in_the_reviews_table(
    ledger: tuple[sessionmaker[Session], ReviewLedger, Settings],
    review_url: str,
    browser: object,
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver

    sessions, built, _settings = ledger
    driver: WebDriver = browser  # type: ignore[assignment]
    driver.get(review_url)
    # The token leaves the address bar: it is in the HttpOnly cookie now.
    assert driver.current_url.rstrip("/").endswith(review_url.split("/?")[0].split("//")[1])
    assert "token=" not in driver.current_url
    assert driver.execute_script("return document.cookie") == ""

    def images_done() -> bool:
        return bool(driver.execute_script("return [...document.images].every(i => i.complete)"))

    wait_for(images_done, "thumbnails to load")
    widths = driver.execute_script(
        "return Object.fromEntries([...document.querySelectorAll('.card')].map("
        "c => [c.dataset.imageId + '/' + c.dataset.face, c.querySelector('img').naturalWidth]))"
    )
    inside = {key: width for key, width in widths.items() if key != f"{built.outside_id}/"}
    assert len(inside) == COUNT + 2 and all(width > 0 for width in inside.values()), widths
    assert widths[f"{built.outside_id}/"] == 0  # outside the roots: refused, never read

    cards = [
        card
        for card in driver.find_elements(By.CSS_SELECTOR, f'.card[data-version="{VERSION}"]')
        if card.get_attribute("data-image-id") != str(built.outside_id)
    ]
    expected: dict[int, str] = {}
    for card in cards[:5]:
        new_label = other_class(card.get_attribute("data-label") or "")
        card.find_element(By.CSS_SELECTOR, f'button[data-choice="{new_label}"]').click()
        expected[int(card.get_attribute("data-image-id") or 0)] = new_label

    keyboard_cards = cards[5:10]
    keyboard_cards[0].find_element(By.TAG_NAME, "img").click()  # focus the first one
    keys = ActionChains(driver)
    for card in keyboard_cards:
        image_id = card.get_attribute("data-image-id")
        for _ in range(COUNT + 3):  # j moves the focus on to this card
            focused = driver.find_element(By.CSS_SELECTOR, ".card.focused")
            if focused.get_attribute("data-image-id") == image_id:
                break
            keys.send_keys("j").perform()
        new_label = other_class(card.get_attribute("data-label") or "", step=2)
        keys.send_keys(str(CLASSES.index(new_label) + 1)).perform()
        expected[int(image_id or 0)] = new_label

    def stored() -> dict[int, tuple[str, str]]:
        with sessions() as session:
            return {
                review.image_id: (review.new_label, review.reviewer)
                for review in session.scalars(select(Review))
            }

    wait_for(lambda: len(stored()) == 10, "10 verdicts in the reviews table")
    assert stored() == {image_id: (label, "carol") for image_id, label in expected.items()}
    wait_for(
        lambda: len(driver.find_elements(By.CSS_SELECTOR, ".card.reviewed")) == 10,
        "the cards to show their human labels",
    )

    # A selection: space on two cards, then one class for both from the selection bar.
    chosen = cards[10:12]
    chosen[0].find_element(By.TAG_NAME, "img").click()
    keys.send_keys(" ").perform()
    chosen[1].find_element(By.TAG_NAME, "img").click()
    keys.send_keys(" ").perform()
    bar = driver.find_element(By.ID, "selection-bar")
    assert bar.is_displayed() and "2 selected" in bar.text
    bar.find_element(By.XPATH, ".//button[text()='happy']").click()
    for card in chosen:
        expected[int(card.get_attribute("data-image-id") or 0)] = "happy"
    wait_for(lambda: len(stored()) == 12, "the selection's verdicts")
    assert stored() == {image_id: (label, "carol") for image_id, label in expected.items()}
    wait_for(lambda: not bar.is_displayed(), "the selection to clear")

    driver.execute_script("window.scrollTo(0, 0)")
    ARTIFACTS.mkdir(exist_ok=True)
    assert driver.save_screenshot(str(ARTIFACTS / "review_page.png"))
