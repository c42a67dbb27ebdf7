"""Screenshots of the web console for the docs, taken in headless Chromium against a demo server.

    python docs/screenshots.py [--out docs]

Starts `quiver serve` on the embedded demo model (admin key, an adapter root, a fresh jobs
directory), gives it some traffic and a small fine-tuning job, then drives the system's Chromium
(Debian: `apt-get install chromium chromium-driver`) through each panel at 1280 px wide and the
playground at 390 px. Writes console-adapters.png, console-playground.png, console-finetune.png,
console-server.png and console-mobile.png.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "training" / "examples" / "json_answers.jsonl"
ADMIN_KEY = "demo-admin-key"
PROMPT = "What is a quiver?"
QUESTIONS = ["What is a quiver?", "What is an arrow?", "What is a bow?", "What is a ship?", "What is a castle?"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _until(check: Callable[[], Any], what: str, timeout: float = 300.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            found = check()
            if found:
                return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.2)


@contextlib.contextmanager
def demo_server(workdir: Path) -> Iterator[str]:
    """`quiver serve` on the demo model; yields its base URL."""
    from engine.demo import ensure_demo_bundle

    root = workdir / "adapters"
    root.mkdir()
    bundle = ensure_demo_bundle()
    shutil.copytree(bundle.adapters["demo-pirate"], root / "pirate-v2")
    port = _free_port()
    log = (workdir / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--admin-key", ADMIN_KEY, "--adapter-root", str(root), "--jobs-dir", str(workdir / "jobs")],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: process.poll() is None and httpx.get(f"{url}/ready").status_code == 200, "the server")
        yield url
    finally:
        process.terminate()
        process.wait(30)
        log.close()


def _chat(http: httpx.Client, model: str, question: str, max_tokens: int = 40) -> None:
    http.post("/v1/chat/completions", json={"model": model, "max_tokens": max_tokens,
                                            "messages": [{"role": "user", "content": question}]})


def traffic(url: str, stop: threading.Event) -> None:
    """Requests for the base model and both demo adapters until `stop`, a few at a time."""
    models = ["quiver-demo", "demo-pirate", "demo-json", "pirate-v2"]

    def worker(offset: int) -> None:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60) as http:
            i = offset
            while not stop.is_set():
                _chat(http, models[i % len(models)], QUESTIONS[i % len(QUESTIONS)], max_tokens=24 + 8 * (i % 4))
                i += 1

    for offset in range(3):
        threading.Thread(target=worker, args=(offset,), daemon=True).start()


def prepare(url: str) -> str:
    """A finished fine-tuning job; returns its id."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=120) as http:
        with EXAMPLES.open("rb") as handle:
            file_id = http.post("/v1/files", data={"purpose": "fine-tune"},
                                files={"file": ("json_answers.jsonl", handle)}).json()["id"]
        job = http.post("/v1/fine_tuning/jobs", json={
            "model": "quiver-demo", "training_file": file_id, "seed": 1, "suffix": "json",
            "hyperparameters": {"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 25, "save_steps": 10,
                                "save_total_limit": 2}}).json()
        job_id = job["id"]
        _until(lambda: http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] in ("succeeded", "failed"),
               "the fine-tuning job", timeout=600)
        return job_id


def browser(width: int, height: int) -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--hide-scrollbars", f"--window-size={width},{height}", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver") or "chromedriver"), options=options)


def _wait(driver: Any, check: Callable[[Any], Any], timeout: float = 120) -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, 0.1, ignored_exceptions=(StaleElementReferenceException,)).until(check)


def _viewport(driver: Any, width: int, height: int) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def _shot(driver: Any, path: Path, width: int, max_height: int = 1400) -> None:
    """The page at `width`, as tall as its content (at most `max_height`)."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    _viewport(driver, width, min(max(height, 720), max_height))
    time.sleep(0.4)  # the resize relayouts and the charts redraw
    driver.save_screenshot(str(path))
    print(f"wrote {path}")


def _sign_in(driver: Any, url: str, panel: str) -> None:
    driver.get(f"{url}/ui/#{panel}")
    field = _wait(driver, lambda d: d.find_element("id", "key") if d.find_element("id", "key").is_displayed() else None)
    field.send_keys(ADMIN_KEY)
    driver.find_element("css selector", "#signin-form button[type=submit]").click()
    _wait(driver, lambda d: d.find_element("id", "nav").is_displayed())


def _playground(driver: Any, url: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    driver.get(f"{url}/ui/#playground")
    _wait(driver, lambda d: d.find_element("id", "panel-playground").is_displayed())
    for field, value in (("prompt", PROMPT), ("adapter-1", "demo-pirate"), ("adapter-2", "demo-json"),
                         ("temperature", "0"), ("max-tokens", "40")):
        driver.find_element("id", field).clear()
        driver.find_element("id", field).send_keys(value)
    driver.find_element("id", "run").click()
    def finished(d: Any) -> bool:
        answers = d.find_elements("css selector", "#answers .answer")
        return len(answers) == 3 and all(a.get_attribute("data-state") in ("done", "error") for a in answers)

    _wait(driver, finished)
    tokens = driver.find_elements("css selector", '#answers .answer[data-model="demo-pirate"] .tok')
    uncertain = [t for t in tokens if float(t.get_attribute("data-logprob")) < -0.5] or tokens
    ActionChains(driver).move_to_element(uncertain[min(2, len(uncertain) - 1)]).perform()


def _adapters(driver: Any) -> None:
    """Register an adapter from the adapter root and pin another, through the page."""
    driver.get(driver.current_url.split("#")[0] + "#adapters")
    _wait(driver, lambda d: d.find_elements("css selector", '#adapters-table tr[data-name="demo-json"]'))
    driver.find_element("id", "adapter-name").send_keys("pirate-copy")
    driver.find_element("id", "adapter-source").send_keys("pirate-v2")
    driver.find_element("id", "register-btn").click()
    _wait(driver, lambda d: d.find_elements("css selector", '#adapters-table tr[data-name="pirate-copy"][data-state="host"]'))
    driver.find_element("css selector", "button[aria-label='Promote demo-json']").click()
    _wait(driver, lambda d: d.find_elements("css selector", '#adapters-table tr[data-name="demo-json"][data-state="pinned"]'))
    time.sleep(3.5)  # one more poll of the list and of /metrics (the token counts)


def take(url: str, job_id: str, out: Path) -> None:
    driver = browser(1280, 900)
    try:
        _viewport(driver, 1280, 900)
        _sign_in(driver, url, "adapters")
        signed_in = time.monotonic()  # the server panel's rolling window starts here
        _adapters(driver)
        _shot(driver, out / "console-adapters.png", 1280)

        _viewport(driver, 1280, 900)
        _playground(driver, url)
        _shot(driver, out / "console-playground.png", 1280)

        _viewport(driver, 1280, 900)
        driver.get(f"{url}/ui/#finetune")
        _wait(driver, lambda d: d.find_elements("css selector", f'#jobs-table tr[data-job="{job_id}"] button'))[0].click()
        _wait(driver, lambda d: d.find_element("id", "job-detail").get_attribute("data-status") == "succeeded")
        _wait(driver, lambda d: d.find_element("id", "serve-job").is_displayed())
        driver.find_element("id", "serve-job").click()  # one click: the job's adapter is pinned
        _wait(driver, lambda d: "is served" in d.find_element("id", "serve-result").text)
        _wait(driver, lambda d: "pinned" in d.find_element("id", "job-adapter").text)
        _shot(driver, out / "console-finetune.png", 1280)

        _viewport(driver, 1280, 900)
        driver.get(f"{url}/ui/#server")
        from selenium.webdriver.support.ui import Select

        Select(driver.find_element("id", "server-window")).select_by_value("60")
        driver.execute_script("document.activeElement.blur()")
        time.sleep(max(0.0, 65 - (time.monotonic() - signed_in)))  # a full minute of scrapes
        _shot(driver, out / "console-server.png", 1280)

        _viewport(driver, 390, 844)
        _playground(driver, url)
        _shot(driver, out / "console-mobile.png", 390, max_height=2400)
    finally:
        driver.quit()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNG files go (default: docs/)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="quiver-screenshots-") as tmp, demo_server(Path(tmp)) as url:
        stop = threading.Event()
        traffic(url, stop)
        try:
            job_id = prepare(url)
            take(url, job_id, args.out)
        finally:
            stop.set()
    return 0


if __name__ == "__main__":
    sys.exit(main())
