"""The Gradio app in a real headless browser (Debian's Chromium, driven by Selenium): upload an exemplar pair and two
queries, click Edit, wait for the results, and take the README's screenshot.

Opt-in (about 30 s, and it needs `apt-get install chromium chromium-driver`):

    python -m pytest -q tests -m browser
    DIFFUSERS_DELTA_SCREENSHOT=docs/app.png python -m pytest -q tests -m browser   # also refresh the screenshot
"""

import io
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import PIL.Image
import pytest

from diffusers_delta import toyworld
from diffusers_delta.app import ExemplarEditor
from diffusers_delta.testing import free_port
from diffusers_delta.toyworld import showcase


pytestmark = pytest.mark.browser
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture
def app_url():
    """`diffusers-delta app` on the embedded toy model, stopped by its PID at the end."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "diffusers_delta.cli", "app", "--port", str(port)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=5)
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the app did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def browser():
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1250"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_click_and_see_the_edits(app_url, browser, tmp_path):
    world = toyworld.model_world()
    example = showcase.find_example(world, showcase.APP_EXAMPLES[world][0][0])  # an edit the shipped model makes
    source, target = example.pair(3)
    paths = {"source": source, "target": target}
    for seed in (11, 12):
        paths[f"query{seed}"] = example.pair(seed)[0]
    for name, image in paths.items():
        image.resize((256, 256)).save(tmp_path / f"{name}.png")  # bigger than the model's 64: resized, and back
    paths = {name: PIL.Image.open(tmp_path / f"{name}.png") for name in paths}
    browser.get(app_url)
    wait = WebDriverWait(browser, 90)
    for element_id, files in (("source", ["source"]), ("target", ["target"]), ("queries", ["query11", "query12"])):
        upload = wait.until(
            expected_conditions.presence_of_element_located((By.CSS_SELECTOR, f"#{element_id} input[type=file]"))
        )
        upload.send_keys("\n".join(str(tmp_path / f"{name}.png") for name in files))
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#queries img")) >= 2)
    browser.find_element(By.CSS_SELECTOR, "#edit").click()
    wait.until(lambda driver: len(driver.find_elements(By.CSS_SELECTOR, "#results img")) >= 4)
    shown = browser.find_elements(By.CSS_SELECTOR, "#results img")
    assert [image.get_attribute("alt") for image in shown] == [
        "exemplar source", "exemplar target", "edited query 1", "edited query 2"
    ]  # fmt: skip
    pipe = toyworld.load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    expected = ExemplarEditor(pipe).edit(paths["source"], paths["target"], [paths["query11"], paths["query12"]])
    for image, edited in zip(shown[2:], expected):
        with urllib.request.urlopen(image.get_attribute("src")) as response:
            received = PIL.Image.open(io.BytesIO(response.read()))
            difference = np.abs(np.asarray(received.convert("RGB"), np.int16) - np.asarray(edited, np.int16))
            assert difference.max() <= 2  # what the page shows (up to the server's thread count's rounding)
    screenshot = tmp_path / "app.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    if os.environ.get("DIFFUSERS_DELTA_SCREENSHOT"):
        shutil.copyfile(screenshot, os.environ["DIFFUSERS_DELTA_SCREENSHOT"])
