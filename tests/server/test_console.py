"""The web console under /ui/.

Without a browser: its files are served without a key, each with its content type, every file the
page loads exists, and the wheel ships them. In headless Chromium, against a server built the way
`quiver serve` builds it (admin key, API key, adapter root, fine-tuning): an admin registers and
promotes an adapter; an API key sees only the playground and streams answers side by side with
per-token logprobs; a training upload lists its bad lines, then a tiny job's loss curve appears and
its adapter is served in one click.

The browser tests drive the system's Chromium through its chromedriver (Debian: `apt-get install
chromium chromium-driver`); nothing downloads a browser. Without them they skip, unless
QUIVER_TEST_REQUIRE_CHROMIUM=1 (set by `.ci/run` once it installed them) turns the skip into a failure.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from starlette.testclient import TestClient

from adapters.config import AdapterConfig
from engine.config import EngineConfig
from engine.demo import DEMO_MODEL_NAME, ensure_demo_bundle
from server.admin.adapters import adapter_routes
from server.app import create_app
from server.http.console import CONTENT_TYPES, console_files
from server.state import ServerState
from server.wiring import build_stateful
from tests.server.conftest import LiveServer

REPO = Path(__file__).resolve().parents[2]
CONSOLE = REPO / "server" / "console"
EXAMPLES = REPO / "training" / "examples" / "json_answers.jsonl"
REQUIRE_ENV = "QUIVER_TEST_REQUIRE_CHROMIUM"
ADMIN_KEY, API_KEY = "console-admin-key", "console-api-key"
WAIT_S = 30


# ------------------------------------------------------------------ without a browser

@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    state = ServerState(engine_factory=lambda: None)  # never started: the files need no engine
    with TestClient(create_app(state, api_key=API_KEY, admin_key=ADMIN_KEY), base_url="http://console") as client:
        yield client


def test_the_console_is_served_without_a_key_and_ui_redirects_to_it(http: TestClient) -> None:
    redirect = http.get("/ui", follow_redirects=False)
    assert redirect.status_code == 308 and redirect.headers["location"] == "/ui/"
    page = http.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="app.js"></script>' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]  # nothing loads from elsewhere
    assert page.headers["x-content-type-options"] == "nosniff"
    assert http.get("/v1/adapters").status_code == 401  # while the API it calls still needs the key


def test_every_console_file_is_served_with_its_content_type(http: TestClient) -> None:
    on_disk = sorted(p.name for p in CONSOLE.iterdir() if p.is_file() and p.suffix in CONTENT_TYPES)
    assert {"index.html", "app.js", "style.css"} <= set(on_disk)
    assert sorted(console_files()) == on_disk
    for name in on_disk:
        response = http.get(f"/ui/{name}")
        assert response.status_code == 200, name
        assert response.headers["content-type"] == CONTENT_TYPES[Path(name).suffix], name
        assert response.content == (CONSOLE / name).read_bytes()


def test_every_file_the_page_loads_exists_and_nothing_comes_from_elsewhere(http: TestClient) -> None:
    wanted = set(re.findall(r'(?:src|href)="([^"#]+)"', http.get("/ui/").text)) - {"data:,"}
    for name in sorted(console_files()):
        if name.endswith(".js"):
            wanted |= set(re.findall(r'from "\./([^"]+)"', http.get(f"/ui/{name}").text))
    assert {"app.js", "style.css", "api.js"} <= wanted
    for name in sorted(wanted):
        assert not name.startswith(("http:", "https:", "//")), name
        assert http.get(f"/ui/{name}").status_code == 200, name


def test_unknown_console_paths_are_404s_in_the_error_envelope(http: TestClient) -> None:
    for path in ("/ui/nope.js", "/ui/console_routes.py", "/ui/..%2Fauth.py", "/ui/sub/app.js"):
        response = http.get(path)
        assert response.status_code == 404, path
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_the_wheel_ships_every_console_file() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["server"]
    for path in CONSOLE.iterdir():
        if path.is_file():
            assert any(fnmatch.fnmatch(f"console/{path.name}", p) for p in patterns), path.name


# ------------------------------------------------------------------ in headless Chromium

def _browser_binaries() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    missing = [name for name, found in (("chromium", browser), ("chromedriver", driver)) if not found]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        reason = (f"no {' or '.join(missing)} (Debian: apt-get install chromium chromium-driver; "
                  "pip install -e .[dev]; .ci/run installs them where it can)")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    return browser, driver  # type: ignore[return-value]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium, chromedriver = _browser_binaries()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--disable-extensions"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)  # a given driver: nothing is fetched
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The demo model with both keys, an adapter root holding a copy of demo-pirate, and fine-tuning."""
    demo = ensure_demo_bundle()
    root = tmp_path_factory.mktemp("adapter-root")
    shutil.copytree(demo.adapters["demo-pirate"], root / "pirate-copy")

    def build() -> object:
        from engine.async_engine import AsyncEngine

        config = EngineConfig(model=str(demo.model_dir), device="cpu", dtype="float32", max_model_len=256,
                              max_num_seqs=8, max_lora_rank=16, max_loras=4)
        return AsyncEngine(config, adapters=demo.adapters, served_model_name=DEMO_MODEL_NAME,
                           adapter_config=AdapterConfig(adapter_root=root))

    state = ServerState(engine_factory=build)
    stateful = build_stateful(state, adapter_routes(state), jobs_dir=tmp_path_factory.mktemp("jobs"),
                              base_model=str(demo.model_dir), model_name=DEMO_MODEL_NAME, poll_interval=0.1,
                              env={"OMP_NUM_THREADS": "1"})
    live = LiveServer(create_app(state, stateful=stateful, api_key=API_KEY, admin_key=ADMIN_KEY)).start()
    yield live.until_ready()
    live.stop()


def _wait(driver: Any, condition: Any, timeout: float = WAIT_S, message: str = "") -> Any:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # Live panels redraw parts of the page while a condition reads them: a stale read is read again.
    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
                         ).until(lambda d: condition(d), message)


def _css(driver: Any, selector: str) -> Any:
    return driver.find_element("css selector", selector)


def _all(driver: Any, selector: str) -> list[Any]:
    return driver.find_elements("css selector", selector)


def _sign_in(driver: Any, live: LiveServer, key: str, panel: str = "") -> None:
    """A fresh tab state (no saved key), then the sign-in form."""
    driver.get(f"{live.base_url}/ui/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{live.base_url}/ui/#{panel}")
    driver.refresh()
    field = _wait(driver, lambda d: (lambda e: e if e.is_displayed() else None)(_css(d, "#key")))
    field.send_keys(key)
    _css(driver, "#signin-form button[type=submit]").click()
    _wait(driver, lambda d: _css(d, "#nav").is_displayed(), message="the console did not open")


def _admin(live: LiveServer) -> httpx.Client:
    return httpx.Client(base_url=live.base_url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30)


def _row_state(driver: Any, name: str) -> str | None:
    rows = _all(driver, f'#adapters-table tr[data-name="{name}"]')
    return rows[0].get_attribute("data-state") if rows else None


def test_an_admin_registers_and_promotes_an_adapter(browser: Any, console_server: LiveServer) -> None:
    _sign_in(browser, console_server, ADMIN_KEY)
    assert [a.text for a in _all(browser, "#nav a") if a.is_displayed()] == [
        "Adapters", "Playground", "Fine-tuning", "Server"]
    _wait(browser, lambda d: _row_state(d, "demo-pirate") is not None)  # the live list, without a click

    browser.refresh()  # the key is kept for the tab: no second sign-in
    _wait(browser, lambda d: _css(d, "#panel-adapters").is_displayed())
    assert not _css(browser, "#signin").is_displayed()

    # A refusal shows the server's own message.
    _css(browser, "#adapter-name").send_keys("console-pirate")
    _css(browser, "#adapter-source").send_keys("no-such-folder")
    _css(browser, "#register-btn").click()
    error = _wait(browser, lambda d: (lambda e: e if e.is_displayed() else None)(_css(d, "#register-error")))
    with _admin(console_server) as admin:
        expected = admin.post("/v1/adapters", json={"name": "console-pirate", "source": "no-such-folder"})
    assert expected.status_code == 400 and error.text == expected.json()["error"]["message"]
    assert _css(browser, "#adapter-source").get_attribute("aria-invalid") == "true"

    source = _css(browser, "#adapter-source")
    source.clear()
    source.send_keys("pirate-copy")
    _css(browser, "#register-btn").click()
    _wait(browser, lambda d: _row_state(d, "console-pirate") == "host", message="the registered adapter")
    assert not _css(browser, "#register-error").is_displayed()
    row = _css(browser, '#adapters-table tr[data-name="console-pirate"]')
    assert row.find_element("css selector", "td[data-col=rank]").text == "8"
    load = row.find_element("css selector", "td[data-col=load]").text
    assert "disk " in load and "register " in load, load  # the server's disk-load time and the call's

    row.find_element("css selector", "button[aria-label='Promote console-pirate']").click()
    _wait(browser, lambda d: _row_state(d, "console-pirate") == "pinned", message="the promoted adapter")
    row = _css(browser, '#adapters-table tr[data-name="console-pirate"]')
    assert row.find_element("css selector", "td[data-col=tier]").text == "gpu"
    assert row.find_element("css selector", "button[aria-label='Demote console-pirate']").is_displayed()
    with _admin(console_server) as admin:
        info = admin.get("/v1/adapters/console-pirate").json()
    assert info["state"] == "pinned" and info["pinned"] is True


def _greedy(live: LiveServer, model: str, prompt: str, max_tokens: int) -> str:
    client = OpenAI(base_url=f"{live.base_url}/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content or ""


def test_an_api_key_sees_only_the_playground_and_streams_answers_side_by_side(
        browser: Any, console_server: LiveServer) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    prompt, max_tokens, models = "What is a quiver?", 24, [DEMO_MODEL_NAME, "demo-pirate", "demo-json"]
    _sign_in(browser, console_server, API_KEY, panel="adapters")
    assert [a.text for a in _all(browser, "#nav a") if a.is_displayed()] == ["Playground"]
    assert _css(browser, "#panel-playground").is_displayed()  # asked for adapters, shown the playground
    assert not _css(browser, "#panel-adapters").is_displayed()
    assert "playground only" in _css(browser, "#who-role").text

    _css(browser, "#prompt").send_keys(prompt)
    _css(browser, "#adapter-1").send_keys("demo-pirate")
    _css(browser, "#adapter-2").send_keys("demo-json")
    for field, value in (("#temperature", "0"), ("#max-tokens", str(max_tokens))):
        _css(browser, field).clear()
        _css(browser, field).send_keys(value)
    _css(browser, "#prompt").send_keys(Keys.CONTROL, Keys.ENTER)

    _wait(browser, lambda d: len(_all(d, "#answers .answer")) == 3)
    assert [a.get_attribute("data-model") for a in _all(browser, "#answers .answer")] == models
    _wait(browser, lambda d: all(a.get_attribute("data-state") == "done" for a in _all(d, "#answers .answer")),
          message="the streams did not finish")
    texts = {}
    for answer in _all(browser, "#answers .answer"):
        body = answer.find_element("css selector", ".tokens")
        assert body.get_attribute("aria-live") == "polite" and body.get_attribute("aria-busy") == "false"
        texts[answer.get_attribute("data-model")] = body.get_attribute("textContent")
        spans = body.find_elements("css selector", ".tok")
        assert spans and all(float(s.get_attribute("data-logprob")) <= 0 for s in spans)
    assert texts == {model: _greedy(console_server, model, prompt, max_tokens) for model in models}
    assert len(set(texts.values())) == 3  # three different answers, each in its own column

    # The top-k of a token: on hover, and from the keyboard.
    first = _css(browser, '#answers .answer[data-model="demo-pirate"] .tok')
    ActionChains(browser).move_to_element(first).perform()
    tip = _wait(browser, lambda d: (lambda e: e if e.is_displayed() else None)(_css(d, "#tok-tip")))
    assert len(tip.find_elements("css selector", "tbody tr")) == 5
    body = _css(browser, '#answers .answer[data-model="demo-json"] .tokens')
    ActionChains(browser).move_to_element(_css(browser, "#playground-title")).perform()
    body.send_keys(Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    selected = _wait(browser, lambda d: _all(d, '#answers .answer[data-model="demo-json"] .tok.sel'))
    assert selected[0].get_attribute("data-index") == "1"
    assert _css(browser, "#tok-tip").is_displayed()


def test_an_upload_lists_its_bad_lines_then_a_job_shows_its_loss_curve_and_is_served(
        browser: Any, console_server: LiveServer, tmp_path: Path) -> None:
    lines = EXAMPLES.read_text().splitlines()[:8]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], "not json", lines[1], '{"messages": "nope"}']) + "\n")
    good = tmp_path / "tiny.jsonl"
    good.write_text("\n".join(lines) + "\n")
    _sign_in(browser, console_server, ADMIN_KEY, panel="finetune")
    _wait(browser, lambda d: _css(d, "#panel-finetune").is_displayed())

    _css(browser, "#ft-file").send_keys(str(bad))
    _css(browser, "#upload-btn").click()
    problems = _wait(browser, lambda d: _all(d, "#upload-result .problems li"))
    assert [p.get_attribute("data-line") for p in problems] == ["2", "4"]
    assert problems[0].find_element("css selector", ".snippet").text == "not json"

    _css(browser, "#ft-file").send_keys(str(good))
    _css(browser, "#upload-btn").click()
    uploaded = _wait(browser, lambda d: _all(d, "#upload-result [data-file-id]"))[0].get_attribute("data-file-id")
    _wait(browser, lambda d: _css(d, "#job-training-file").get_attribute("value") == uploaded)

    # 8 examples, batch 4, 2 epochs: 4 steps, a checkpoint every 2.
    for field, value in (("#hp-epochs", "2"), ("#hp-batch", "4"), ("#hp-lr", "10"),
                         ("#hp-extra", json.dumps({"save_steps": 2}))):
        _css(browser, field).send_keys(value)
    _css(browser, "#start-job").click()
    detail = _wait(browser, lambda d: (lambda e: e if e.get_attribute("data-job") else None)(_css(d, "#job-detail")))
    job_id = detail.get_attribute("data-job")

    _wait(browser, lambda d: int(_css(d, '#loss-chart path[data-series="train_loss"]').get_attribute("data-count")) >= 2,
          timeout=180, message="no loss curve")
    _wait(browser, lambda d: _css(d, "#job-detail").get_attribute("data-status") == "succeeded", timeout=180,
          message="the job did not succeed")
    _wait(browser, lambda d: _css(d, '#loss-chart path[data-series="train_loss"]').get_attribute("data-count") == "4")
    with _admin(console_server) as admin:
        events = admin.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100}).json()["data"]
    assert sum(e["type"] == "metrics" for e in events) == 4
    checkpoints = _wait(browser, lambda d: sorted(c.text for c in _all(d, "#checkpoints-table tbody code")))
    assert checkpoints == [f"ft-{job_id}:ckpt-2", f"ft-{job_id}:ckpt-4"]

    serve = _css(browser, "#serve-job")
    assert serve.text == f"Serve ft-{job_id}"
    serve.click()
    _wait(browser, lambda d: "is served" in _css(d, "#serve-result").text, message="the adapter was not served")
    with _admin(console_server) as admin:
        assert admin.get(f"/v1/adapters/ft-{job_id}").json()["state"] == "pinned"
    _wait(browser, lambda d: _css(d, "#serve-job").get_attribute("disabled") is not None)
