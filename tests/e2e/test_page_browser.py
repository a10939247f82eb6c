"""The status page in a real headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by selenium), against a real sidecar and token endpoints.

Without Chromium these tests skip, saying why, unless MCP_EXT_AUTHZ_BROWSER=required (set
by .ci/run, which installs it): then they fail. MCP_EXT_AUTHZ_UPDATE_SCREENSHOTS=1 writes
the screenshots of docs/operating.md from the page as these tests see it.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from ext_authz._proto.envoy.service.auth.v3 import external_auth_pb2_grpc
from tests.e2e.harness import ROOT, Process, free_port, start_sidecar
from tests.test_service import check_request
from tests.token_endpoint import ThreadedTokenEndpoint, TokenEndpoint

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
REQUIRED = os.environ.get("MCP_EXT_AUTHZ_BROWSER") == "required"
SCREENSHOTS = ROOT / "docs/images"
XSS = "<img src=x onerror=alert(1)>"
ADMIN_TOKEN = "page-token-0123456789abcdef"


@dataclass
class Page:
    origin: str
    driver: Any
    sidecar: Process
    config_path: Path
    config: dict[str, Any]
    grpc_port: int
    tokens: TokenEndpoint

    def open(self) -> None:
        self.driver.get(self.origin + "/")
        self.until(lambda: len(self.rows("#servers tbody tr")) >= 2)

    def rows(self, selector: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return list(self.driver.find_elements(By.CSS_SELECTOR, selector))

    def text(self, selector: str) -> str:
        from selenium.webdriver.common.by import By

        return str(self.driver.find_element(By.CSS_SELECTOR, selector).text)

    def until(self, condition: Callable[[], object], timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "the page did not show it in time"
            time.sleep(0.1)

    def server_row(self, name: str) -> str:
        return self.text(f'#servers tr[data-server="{name}"]')

    def shoot(self, section: str) -> None:
        from selenium.webdriver.common.by import By

        if os.environ.get("MCP_EXT_AUTHZ_UPDATE_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(exist_ok=True)
            self.driver.find_element(By.ID, section).screenshot(
                str(SCREENSHOTS / f"status-{section}.png"))


def _driver() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1400,1000", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-default-apps", "--disable-sync"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=str(DRIVER)), options=options)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None or DRIVER is None:
        message = "the page's browser tests need Debian's chromium and chromium-driver"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    driver = _driver()
    yield driver
    driver.quit()


def _config(ports: dict[str, int], good: str, bad: str, **admin: Any) -> dict[str, Any]:
    return {
        "grpc": {"listen": f"127.0.0.1:{ports['grpc']}"},
        "admin": {"listen": f"127.0.0.1:{ports['admin']}", **admin},
        "network": {"internal_ranges": ["10.0.0.0/8"],
                    "networks": {"partners": ["198.51.100.0/24"]}},
        "tokens": {"retry_initial_s": 0.2, "retry_max_s": 1},
        "servers": {
            "pub": {"title": XSS, "tools": {"delete": {"available_on_public_internet": False}}},
            "crm": {"title": "Customers", "available_on_public_internet": False,
                    "visible_to": ["partners"],
                    "oauth2": {"token_url": good, "client_id": "crm",
                               "client_secret": "crm-client-secret"}},
            "billing": {"available_on_public_internet": False,
                        "oauth2": {"token_url": bad, "client_id": "billing",
                                   "client_secret": "billing-client-secret"}},
        },
    }


@pytest.fixture(scope="module")
def page(browser: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    workdir = tmp_path_factory.mktemp("page")
    ports = {"grpc": free_port(), "admin": free_port()}
    with ThreadedTokenEndpoint() as good, ThreadedTokenEndpoint() as bad:
        bad.mode, bad.status = "status", 401
        config = _config(ports, good.url, bad.url)
        path = workdir / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        sidecar = start_sidecar(path, workdir)
        try:
            sidecar.wait_port(ports["admin"])
            yield Page(f"http://127.0.0.1:{ports['admin']}", browser, sidecar, path, config,
                       ports["grpc"], good)
        finally:
            sidecar.stop()


def _checks(page: Page, requests: list[tuple[str, str]]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{page.grpc_port}") as channel:
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for peer, path in requests:
            stub.Check(check_request(peer=peer, path=path), timeout=10)


class TestEveryPart:
    def test_servers_networks_and_who_sees_what(self, page: Page) -> None:
        page.open()
        page.until(lambda: "warm" in page.server_row("crm"))
        crm = page.server_row("crm")
        assert "visible to: partners" in crm
        assert "/mcp/crm" in crm
        assert "crm-client-secret" not in page.driver.page_source
        assert all(token not in page.driver.page_source for token in page.tokens.issued)
        assert "Public" in page.server_row("pub")
        assert "1 / 0 / 0" in page.server_row("pub")
        networks = page.text("#networks dl")
        assert "198.51.100.0/24" in networks
        assert "from 127.0.0.1 (peer), network external" in networks
        matrix = page.text("#matrix tbody")
        assert matrix.splitlines()[0].split() == ["pub", "visible", "visible", "visible"]
        page.driver.find_element("id", "matrix-items").click()
        page.until(lambda: "tools.delete" in page.text("#matrix tbody"))
        assert "generation\n1" in page.text("#config dl")
        for section in ("servers", "matrix", "networks", "config"):
            page.shoot(section)

    def test_a_title_is_text(self, page: Page) -> None:
        """A server titled `<img src=x onerror=...>` shows those characters; no element is
        made of them (and no alert stops the driver)."""
        page.open()
        assert XSS in page.server_row("pub")
        assert page.rows("img") == []

    def test_a_failing_token_says_why_and_never_a_secret(self, page: Page) -> None:
        page.open()
        page.until(lambda: "failing" in page.server_row("billing"))
        row = page.server_row("billing")
        assert "credentials refused" in row
        assert "HTTP 401" in row
        assert "billing-client-secret" not in page.driver.page_source

    def test_recent_decisions_live_and_filtered(self, page: Page) -> None:
        page.open()
        _checks(page, [("203.0.113.9", "/mcp/crm"), ("198.51.100.7", "/mcp/crm"),
                       ("10.1.2.3", "/mcp/pub")])
        page.until(lambda: len(page.rows("#decisions tbody tr")) >= 3)  # no reload needed
        field = page.driver.find_element("css selector", '#decision-filters [name="server"]')
        field.send_keys("crm")
        page.until(lambda: {r.text.split()[1] for r in page.rows("#decisions tbody tr")}
                   == {"crm"})
        reasons = page.text("#decisions tbody")
        assert "not_found" in reasons
        assert "allowed" in reasons
        page.shoot("decisions")
        field.clear()

    def test_try_a_caller_is_check(self, page: Page) -> None:
        page.open()
        form = page.driver.find_element("id", "try-form")
        for name, value in (("peer", "203.0.113.9"), ("path", "/mcp/crm")):
            box = form.find_element("name", name)
            box.clear()
            box.send_keys(value)
        form.find_element("css selector", "button").click()
        page.until(lambda: "HTTP" in page.text("#try-result"))
        checked = json.loads(subprocess.run(
            [sys.executable, "-m", "ext_authz", "check", "--config", str(page.config_path),
             "--peer", "203.0.113.9", "--path", "/mcp/crm", "--host", "gateway"],
            capture_output=True, text=True, timeout=60, check=True).stdout)
        shown = page.text("#try-result")
        assert f"{checked['reason']} (HTTP {checked['http_status']})" in shown
        for step in checked["steps"]:
            assert step in shown
        page.shoot("try")

    def test_preview_a_change(self, page: Page) -> None:
        page.open()
        before = page.config_path.read_text()
        page.driver.find_element(
            "css selector", '#servers tr[data-server="crm"] button.toggle').click()
        page.until(lambda: "external gains servers.crm" in page.text("#preview-result"))
        shown = page.text("#preview-result")
        assert "! external gains servers.crm (hidden → visible;" in shown
        yaml_shown = page.text("#preview-result pre")
        assert "available_on_public_internet: true" in yaml_shown
        # The file writes its secrets inline: never shown, not even there.
        assert "client_secret: ${REDACTED}" in yaml_shown
        assert "crm-client-secret" not in page.driver.page_source
        assert page.config_path.read_text() == before  # nothing written
        page.shoot("preview")

    def test_a_reload_changes_the_page(self, page: Page) -> None:
        page.open()
        changed = json.loads(json.dumps(page.config))
        changed["servers"]["added"] = {"title": "Added later"}
        page.config_path.write_text(yaml.safe_dump(changed, sort_keys=False))
        os.kill(page.sidecar.popen.pid, signal.SIGHUP)
        page.until(lambda: page.rows('#servers tr[data-server="added"]'))
        assert "generation\n2" in page.text("#config dl")
        assert ": ok" in page.text("#config dl")

    def test_only_the_admin_origin_is_asked(self, page: Page) -> None:
        """Everything the browser fetched while these tests ran: this origin, nothing else."""
        page.open()
        time.sleep(2.5)  # a refresh or two
        urls = {params["request"]["url"]
                for params in _network(page.driver, "Network.requestWillBeSent")}
        assert urls
        assert {url for url in urls if not url.startswith(page.origin + "/")} == set()


def test_beyond_loopback_the_page_takes_the_token(browser: Any, tmp_path: Path) -> None:
    """Listening on every address, the page answers 401 (the browser's own login prompt)
    until the token comes as HTTP Basic's password; scripts may send it as Bearer."""
    ports = {"grpc": free_port(), "admin": free_port()}
    token_file = tmp_path / "admin-token"
    token_file.write_text(ADMIN_TOKEN + "\n")
    with ThreadedTokenEndpoint() as good:
        config = _config(ports, good.url, good.url, auth={"token_file": str(token_file)})
        config["admin"]["listen"] = f"0.0.0.0:{ports['admin']}"
        path = tmp_path / "sidecar.yaml"
        path.write_text(yaml.safe_dump(config))
        sidecar = start_sidecar(path, tmp_path)
        try:
            sidecar.wait_port(ports["admin"])
            origin = f"http://127.0.0.1:{ports['admin']}"
            browser.execute_cdp_cmd("Network.enable", {})
            browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
            browser.get_log("performance")  # what came before
            browser.get(origin + "/")
            assert _statuses(browser, origin + "/") == [401]  # (headless: no prompt shown)
            assert "crm" not in browser.page_source
            basic = base64.b64encode(f"operator:{ADMIN_TOKEN}".encode()).decode()
            browser.execute_cdp_cmd("Network.setExtraHTTPHeaders",
                                    {"headers": {"Authorization": f"Basic {basic}"}})
            try:
                browser.get(origin + "/")
                assert 200 in _statuses(browser, origin + "/")
                deadline = time.monotonic() + 15
                while "crm" not in browser.find_element("id", "servers").text:
                    assert time.monotonic() < deadline, browser.page_source[:500]
                    time.sleep(0.1)
            finally:
                browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})
        finally:
            sidecar.stop()


def _statuses(browser: Any, url: str) -> list[int]:
    """The HTTP statuses the browser got for `url` since its log was last read."""
    return [int(params["response"]["status"])
            for params in _network(browser, "Network.responseReceived")
            if params["response"]["url"] == url]


def _network(browser: Any, method: str) -> list[dict[str, Any]]:
    """The parameters of each DevTools event `method` in the browser's performance log since
    it was last read (reading empties it)."""
    messages = [json.loads(entry["message"])["message"]
                for entry in browser.get_log("performance")]
    return [message["params"] for message in messages if message["method"] == method]
