"""The playground page at `GET /` of `mio serve`: a real server (tiny checkpoint) driven by headless Chromium.

Screenshots of each state go to pytest's tmp dir; with MIO_PLAYGROUND_SCREENSHOTS=DIR the page with a
generated image is also written as DIR/playground.png (the one in docs/).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("the playground test needs chromium and chromedriver on PATH (apt install chromium "
                "chromium-driver)", allow_module_level=True)
try:
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"the playground test needs selenium ({exc})", allow_module_level=True)

from mio_testing import Server  # noqa: E402

RUN_TIMEOUT_S = 300
TEXT = {"max-new-tokens": "8", "seed": "0"}
MEDIA = {"max-new-tokens": "40", "seed": "4", "steps": "2", "size": "64"}


@pytest.fixture(scope="module")
def server(tiny_model: Path) -> Iterator[Server]:
    running = Server(tiny_model)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000",
                "--autoplay-policy=no-user-gesture-required", "--mute-audio"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("playground-screenshots")


@pytest.fixture(scope="module")
def media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("playground-media")
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / "photo.png")
    t = np.arange(16000) / 16000
    soundfile.write(folder / "tone.wav", (0.3 * np.sin(2 * np.pi * 300 * t)).astype("float32"), 16000)
    (folder / "broken.png").write_bytes(b"\x00garbage, not a PNG at all" * 10)
    return folder


def screenshot(driver: webdriver.Chrome, shots: Path, name: str, docs: bool = False) -> Path:
    """The whole page (the window grows to its height for the shot), into pytest's tmp dir."""
    path = shots / f"{name}.png"
    size = driver.get_window_size()
    chrome, height = driver.execute_script(
        "return [window.outerHeight - window.innerHeight, document.documentElement.scrollHeight]")
    driver.set_window_size(size["width"], min(3000, max(size["height"], height + chrome)))
    try:
        assert driver.save_screenshot(str(path)), path
    finally:
        driver.set_window_size(size["width"], size["height"])
    wanted = os.environ.get("MIO_PLAYGROUND_SCREENSHOTS")
    if docs and wanted:
        Path(wanted).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(wanted) / "playground.png")
    return path


def open_page(driver: webdriver.Chrome, server: Server) -> None:
    driver.get(server.url + "/")
    WebDriverWait(driver, 30).until(lambda d: "Checking" not in d.find_element(By.ID, "health").text)


def run_task(driver: webdriver.Chrome, task: str, text: str | None = None, file: Path | None = None,
             settings: dict[str, str] | None = None) -> str:
    """Fill the form, press Run, wait for the end of the stream; the output's state (done or error)."""
    Select(driver.find_element(By.ID, "task")).select_by_value(task)
    if text is not None:
        box = driver.find_element(By.ID, "text")
        box.clear()
        box.send_keys(text)
    if file is not None:
        driver.find_element(By.ID, "file").send_keys(str(file))
    if settings:
        driver.find_element(By.CSS_SELECTOR, "#settings > summary").click()
        for name, value in settings.items():
            field = driver.find_element(By.ID, name)
            field.clear()
            field.send_keys(value)
    driver.execute_script("document.getElementById('output').dataset.state = 'idle'")
    driver.find_element(By.ID, "run").click()
    try:
        WebDriverWait(driver, RUN_TIMEOUT_S).until(
            lambda d: d.find_element(By.ID, "output").get_attribute("data-state") in ("done", "error"))
    except TimeoutException:
        pytest.fail(f"{task} did not finish; status: {driver.find_element(By.ID, 'status').text!r}")
    return driver.find_element(By.ID, "output").get_attribute("data-state")


def page_errors(driver: webdriver.Chrome) -> list[str]:
    """Console errors (a CSP violation, a script error); 401s of a keyed server are expected and left out."""
    return [entry["message"] for entry in driver.get_log("browser")
            if entry["level"] == "SEVERE" and "401" not in entry["message"]]


def downloads(driver: webdriver.Chrome) -> list:
    return driver.find_elements(By.CSS_SELECTOR, "#results a.download")


def visible_error(driver: webdriver.Chrome) -> str:
    return " ".join(e.text for e in driver.find_elements(By.CSS_SELECTOR, ".error") if e.is_displayed())


def test_page_loads_labelled_and_fits_a_phone(server, browser, shots):
    browser.set_window_size(375, 800)
    try:
        open_page(browser, server)
        assert "Model" in browser.find_element(By.ID, "health").text
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"horizontal scrolling at phone width: {width}"
        unlabelled = browser.execute_script("""
            return [...document.querySelectorAll('input, select, textarea, button')]
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
              .map(e => e.id || e.outerHTML);""")
        assert unlabelled == []
        # The keyboard reaches the controls in order (Tab from the task goes to the file of a caption), with a
        # visible focus ring.
        browser.execute_script("document.getElementById('task').focus()")
        browser.switch_to.active_element.send_keys(Keys.TAB)
        focused = browser.switch_to.active_element
        assert focused.get_attribute("id") == "file"
        assert focused.value_of_css_property("outline-style") != "none"
        screenshot(browser, shots, "phone-width")
        assert page_errors(browser) == []
    finally:
        browser.set_window_size(1200, 1000)


def test_caption_an_image(server, browser, shots, media):
    open_page(browser, server)
    state = run_task(browser, "caption", file=media / "photo.png", settings=TEXT)
    screenshot(browser, shots, "caption")
    assert state == "done", visible_error(browser)
    [card] = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert "photo.png" in card.text
    assert card.find_elements(By.CSS_SELECTOR, ".answer, .help")
    assert "Model" in browser.find_element(By.ID, "health").text
    assert page_errors(browser) == []


def test_imagine_an_image(server, browser, shots):
    open_page(browser, server)
    state = run_task(browser, "imagine", text="a red kite", settings=MEDIA)
    assert state == "done", visible_error(browser)
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const i = document.querySelector('#results img'); return i && i.complete && i.naturalWidth > 0"))
    image = browser.find_element(By.CSS_SELECTOR, "#results img")
    assert image.get_attribute("src").startswith(("blob:", "data:image/png"))
    assert browser.execute_script("return document.querySelector('#results img').naturalWidth") == 64
    assert any(a.get_attribute("download").endswith(".png") for a in downloads(browser))
    screenshot(browser, shots, "imagine", docs=True)
    assert page_errors(browser) == []


def test_transcribe_a_recording(server, browser, shots, media):
    open_page(browser, server)
    state = run_task(browser, "asr", file=media / "tone.wav", settings=TEXT)
    screenshot(browser, shots, "asr")
    assert state == "done", visible_error(browser)
    [card] = browser.find_elements(By.CSS_SELECTOR, "#results .result")
    assert "tone.wav" in card.text and "asr" in card.text
    assert page_errors(browser) == []


def test_speech_plays(server, browser, shots):
    open_page(browser, server)
    state = run_task(browser, "tts", text="hello there", settings=MEDIA)
    assert state == "done", visible_error(browser)
    browser.find_element(By.CSS_SELECTOR, "#results audio")
    played = browser.execute_async_script("""
        const done = arguments[arguments.length - 1];
        const audio = document.querySelector('#results audio');
        const report = (error) => done({error, readyState: audio.readyState, duration: audio.duration,
                                        mediaError: audio.error && audio.error.code});
        const start = () => audio.play().then(() => report(null), (e) => report(String(e)));
        if (audio.readyState > 0) start(); else {
          audio.addEventListener('loadedmetadata', start, {once: true});
          audio.addEventListener('error', () => report('media error'), {once: true});
          audio.load();
        }""")
    screenshot(browser, shots, "tts")
    assert played["error"] is None and played["mediaError"] is None, played
    assert played["readyState"] > 0 and played["duration"] > 0, played
    assert any(a.get_attribute("download").endswith(".wav") for a in downloads(browser))
    assert page_errors(browser) == []


def test_corrupt_upload_shows_an_error(server, browser, shots, media):
    open_page(browser, server)
    state = run_task(browser, "caption", file=media / "broken.png", settings=TEXT)
    screenshot(browser, shots, "corrupt-upload")
    assert state == "error"
    message = visible_error(browser)
    assert "Error" in message and "broken.png" in message, message


def test_keyed_server_asks_for_the_key(tiny_model, browser, shots):
    keyed = Server(tiny_model, "--api-key", "s3cret-key")
    try:
        open_page(browser, keyed)
        assert "key" in browser.find_element(By.ID, "health").text.lower()
        assert browser.find_element(By.ID, "key-panel").get_attribute("open") is not None
        assert "API key" in visible_error(browser)
        screenshot(browser, shots, "key-needed")
        browser.find_element(By.ID, "api-key").send_keys("s3cret-key")
        browser.find_element(By.ID, "save-key").click()
        WebDriverWait(browser, 30).until(lambda d: "Model" in d.find_element(By.ID, "health").text)
        assert visible_error(browser) == ""
        stored = browser.execute_script("return sessionStorage.getItem('mio-api-key')")
        assert stored == "s3cret-key"
        browser.execute_script("sessionStorage.clear()")
    finally:
        keyed.stop()
