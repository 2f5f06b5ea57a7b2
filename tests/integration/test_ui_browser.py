"""The web UI in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven with Selenium) against a real ``appliance serve``: log in, the machine list, a
machine's page, the reimage form from the list (a wrong confirmation refused, then the
right one), the live progress page updating in place as the machine's IPMI BMC
(OpenIPMI's ``ipmi_sim``) takes the reimage's requests, a form posted without its CSRF
token refused, log out. A screenshot of every step is saved (see :func:`artifacts_dir`).

Everything runs in a network namespace the test creates: the appliance, the BMC and the
browser itself, so the browser reaches nothing but the namespace's loopback. ChromeDriver
runs on this host's loopback and starts Chromium through ``ip netns exec`` (a wrapper
script as the browser binary), talking to it over a pipe (``--remote-debugging-pipe``),
not a TCP port. ChromeDriver is given by path, so Selenium Manager (which would download
drivers and browsers) never runs; the test makes sure of that.

The reimage's BMC requests must not finish before the progress page has shown the
machine waiting for them, or the page would have nothing to update. So the appliance
runs as two ``appliance serve`` processes on one database: the HTTP part (and the
lifecycle part) from the start, the power part only once the page shows
``provisioning``/``power``; then the page must change to ``boot`` without a reload.

Then the machine's page draws the run's boot timeline; the machine "boots" from the
network from a second namespace (busybox udhcpc with its MAC against the appliance's DHCP
part, curl fetching its boot script, kernel and initrd) and the timeline fills in on the
page without a reload: DHCP, script and kernel/initrd done, the installer running.
The machine page's identify and power-off buttons (power off through its confirmation
page) act on the BMC, and the page follows each request to its outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import netns
from tests.conftest import ApplianceProcess, require_root
from tests.ipmisim import enroll, running_fleet
from tests.unit.test_provisioning import ANSWER, INSTALLER, write_tree

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
BASE = "http://127.0.0.1:8080"
MAC = "52:54:00:66:00:01"
HOST = "web1"
USER, PASSWORD = "alice", "correct horse battery"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorKeyOperatorKeyOperatorKeyOper op@desk"
#: Seconds to wait for a page element, and for the progress row to change.
WAIT, PROGRESS_WAIT = 20, 60
#: The machine's network: the appliance's DHCP part on SERVER_IF in the test's
#: namespace, the machine (udhcpc and curl with its MAC) in a second namespace.
SERVER_IF, CLIENT_IF, SERVER_ADDR = "uisrv0", "uicli0", "10.250.66.1"

CONFIG = """\
state_dir = "{state}"
log_level = "INFO"
[http]
bind = "0.0.0.0"
port = 8080
[dhcp]
interface = "{srv_if}"
[tftp]
enabled = false
[syslog]
enabled = false
[power]
call_timeout = 5
attempts = 2
backoff = 0.5
poll_interval = 0
[boot]
bootenvs_dir = "{bootenvs}"
templates_dir = "{templates}"
"""


def artifacts_dir() -> Path:
    """Screenshots go to ``$APPLIANCE_TEST_ARTIFACTS/ui``, by default
    ``<repo>/test-artifacts/ui`` (ignored by git)."""
    root = os.environ.get("APPLIANCE_TEST_ARTIFACTS") or str(REPO / "test-artifacts")
    return Path(root) / "ui"


def _say(config: pytest.Config, line: str) -> None:
    """A line in the test output now, even with output capture on."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None:
        print(line)
        return
    with capture.global_and_fixture_disabled():
        reporter.ensure_newline()
        reporter.write_line(line)


class Browser:
    """Headless Chromium inside ``ns`` driven by ChromeDriver (on this host's loopback)."""

    def __init__(self, ns: netns.Namespace, workdir: Path, shots: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.shots = shots
        self.count = 0
        workdir.mkdir(parents=True, exist_ok=True)
        self.pid_file = workdir / "chromium.pid"
        self.profile = workdir / "profile"
        # The browser binary ChromeDriver starts: Debian's chromium inside the namespace.
        # `ip netns exec` execs it, so the PID written here is the browser's.
        wrapper = workdir / "chromium-in-netns"
        wrapper.write_text(f'#!/bin/sh\necho $$ > "{self.pid_file}"\n'
                           f'exec ip netns exec {ns.name} {CHROMIUM} "$@"\n')
        wrapper.chmod(0o755)
        options = webdriver.ChromeOptions()
        options.binary_location = str(wrapper)
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                    "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                    "--window-size=1280,900", "--no-first-run", "--disable-sync",
                    "--disable-component-update", "--disable-background-networking",
                    "--disable-features=Translate,OptimizationHints,MediaRouter"):
            options.add_argument(arg)
        self.driver_log = workdir / "chromedriver.log"
        self.service = Service(CHROMEDRIVER, log_output=str(self.driver_log))
        self.driver = webdriver.Chrome(service=self.service, options=options)
        self.driver.set_page_load_timeout(WAIT)

    # -- reading and acting
    def get(self, path: str) -> None:
        self.driver.get(BASE + path)

    def path(self) -> str:
        return self.driver.current_url.removeprefix(BASE)

    def find(self, css: str) -> Any:
        from selenium.webdriver.common.by import By

        return self.driver.find_element(By.CSS_SELECTOR, css)

    def finds(self, css: str) -> list[Any]:
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def wait_for(self, css: str, timeout: float = WAIT) -> Any:
        """The first element matching ``css`` once it is there."""
        try:
            return netns.wait_for(lambda: next(iter(self.finds(css)), None), timeout)
        except TimeoutError:
            raise AssertionError(f"no {css!r} after {timeout} s on {self.path()}:\n"
                                 f"{self.text()[:2000]}") from None

    def text(self) -> str:
        return self.driver.execute_script("return document.body ? document.body.innerText "
                                          ": ''")

    def status(self) -> int:
        """The HTTP status of the document shown (Navigation Timing)."""
        return self.driver.execute_script(
            "return performance.getEntriesByType('navigation')[0].responseStatus")

    def submit(self, form_css: str) -> None:
        """Click the form's submit button and wait for the next document."""
        old = self.find("html")
        self.find(f"{form_css} button[type=submit]").click()
        netns.wait_for(lambda: _stale(old), WAIT, what=f"a new page after submitting {form_css}")

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def quit(self) -> None:
        try:
            self.driver.quit()  # ends Chromium, then stops ChromeDriver
        finally:
            self.service.stop()
            _kill_if_ours(self.pid_file, str(self.profile))


def _stale(element: Any) -> bool:
    from selenium.common.exceptions import StaleElementReferenceException

    try:
        element.tag_name  # noqa: B018
    except StaleElementReferenceException:
        return True
    return False


def _kill_if_ours(pid_file: Path, marker: str) -> None:
    """A browser still running after quit: killed by its PID, if it is the one started
    here (its command line names this test's profile directory)."""
    try:
        pid = int(pid_file.read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError):
        return
    if marker in cmdline:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def browser(namespace: netns.Namespace, tmp_path: Path, request: pytest.FixtureRequest,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[Browser]:
    require_root()
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.access(path, os.X_OK):
            msg = f"{path} missing: apt-get install chromium chromium-driver"
            if os.environ.get("CI"):
                pytest.fail(msg)
            pytest.skip(msg)
    pytest.importorskip("selenium", reason="pip install selenium (the test extras)")
    from selenium.webdriver.common.selenium_manager import SeleniumManager

    def no_manager(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Selenium Manager was invoked: it may download drivers")

    # Selenium Manager must never run (it fetches drivers and browsers from the internet):
    # offline if it did, and an error here.
    monkeypatch.setenv("SE_OFFLINE", "true")
    monkeypatch.setattr(SeleniumManager, "binary_paths", no_manager)
    shots = artifacts_dir()
    shots.mkdir(parents=True, exist_ok=True)
    for old in [*shots.glob("[0-9][0-9]-*.png"), *shots.glob("[0-9][0-9]-*.html")]:
        old.unlink()
    _say(request.config, f"browser test screenshots: {shots}")
    b = Browser(namespace, tmp_path / "browser", shots)
    try:
        yield b
    finally:
        b.quit()
        if b.driver_log.exists():
            shutil.copy(b.driver_log, shots / b.driver_log.name)


class UiRig:
    """The appliance with a tiny installing bootenv (fake kernel and initrd), user alice,
    and machine web1 whose BMC is an ipmi_sim. The power part is started on demand."""

    def __init__(self, ns: netns.Namespace, tmp: Path, bmc_port: int, bmc_password: str):
        self.ns = ns
        tmp.mkdir(parents=True, exist_ok=True)
        self.client_dir = tmp
        tree = write_tree(tmp, {"tiny": INSTALLER}, {"answers/answer.cfg.j2": ANSWER})
        for rel in ("tiny/linux", "tiny/linux.efi", "tiny/initrd.gz"):
            path = tree.images_dir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
        self.client = netns.new_namespace("apuicl")
        try:
            netns.veth(ns, SERVER_IF, self.client, CLIENT_IF)
            ns.ip("addr", "add", f"{SERVER_ADDR}/24", "dev", SERVER_IF)
            self.client.ip("link", "set", "dev", CLIENT_IF, "down")
            self.client.ip("link", "set", "dev", CLIENT_IF, "address", MAC)
            self.client.ip("link", "set", "dev", CLIENT_IF, "up")
            config = CONFIG.format(state=tree.state_dir, bootenvs=tree.boot.bootenvs_dir,
                                   templates=tree.boot.templates_dir, srv_if=SERVER_IF)
            self.app = ApplianceProcess(ns, tmp, config, only=["http", "lifecycle", "dhcp"])
            (tmp / "power").mkdir()
            self.power = ApplianceProcess(ns, tmp / "power", config, only=["power"])
            self.app.cli("db", "upgrade")
            self.app.cli("user", "add", USER, "--password-stdin", input=PASSWORD + "\n")
            enroll(self.app, HOST, MAC, bmc_port, bmc_password)
            self.app.cli("subnet", "add", "10.250.66.0/24", "--pool",
                         "10.250.66.100-10.250.66.150")
            self.app.start()
            netns.wait_for(lambda: ":8080 " in ns.exec(["ss", "-Hlnt"], check=False).stdout
                           and ":67 " in ns.exec(["ss", "-Hlnu"], check=False).stdout, 30,
                           what="the HTTP and DHCP parts up:\n" + self.app.log()[-2000:])
        except BaseException:
            if getattr(self, "app", None) is not None:
                self.app.stop()
            self.client.delete()
            raise

    def machine(self) -> dict[str, Any]:
        return json.loads(self.app.cli("machine", "show", HOST, "--json").stdout)

    def events(self) -> list[dict[str, Any]]:
        return json.loads(self.app.cli("events", "--machine", MAC, "--json", "--limit",
                                       "500").stdout)

    def start_power(self) -> None:
        self.power.start()
        self.power.wait_log("power:", 30)

    def network_boot(self) -> str:
        """What the machine does when it boots from the network, by real clients from
        its own namespace: a DHCP lease (busybox udhcpc), its boot script, its kernel and
        initrd (curl). Returns its address."""
        script = self.client_dir / "udhcpc.sh"
        script.write_text('#!/bin/sh\n[ "$1" = bound ] && echo "LEASE $ip" && '
                          f'ip addr add "$ip/24" dev {CLIENT_IF}\nexit 0\n')
        script.chmod(0o755)
        out = self.client.exec(["busybox", "udhcpc", "-i", CLIENT_IF, "-f", "-q", "-n",
                                "-t", "5", "-T", "1", "-s", str(script)], timeout=30).stdout
        address = next(line.split()[1] for line in out.splitlines()
                       if line.startswith("LEASE "))
        base = f"http://{SERVER_ADDR}:8080"
        for path in (f"/boot/{MAC}.ipxe", "/images/tiny/linux", "/images/tiny/initrd.gz"):
            self.client.exec(["curl", "-sS", "-f", "--max-time", "10", "-o", "/dev/null",
                              base + path], timeout=15)
        return address

    def close(self) -> None:
        self.power.stop()
        self.app.stop()
        self.client.delete()


@pytest.fixture
def rig(namespace: netns.Namespace, tmp_path: Path) -> Iterator[tuple[UiRig, Any]]:
    with running_fleet(tmp_path / "bmcs", 1, ns=namespace) as (bmc,):
        r = UiRig(namespace, tmp_path / "appliance", bmc.port, bmc.password)
        try:
            yield r, bmc
        finally:
            r.close()
            print(r.app.log()[-3000:], r.power.log()[-3000:])


def _facts(b: Browser) -> dict[str, tuple[str, float, float, float]]:
    """A machine page's facts: label -> (value, label's top, value's top, list's bottom)."""
    rows = b.driver.execute_script("""
        const dl = document.querySelector("dl.facts").getBoundingClientRect();
        return Array.from(document.querySelectorAll("dl.facts dt")).map(dt => {
          const dd = dt.nextElementSibling;
          return [dt.textContent, dd.textContent, dt.getBoundingClientRect().top,
                  dd.getBoundingClientRect().top, dl.bottom + window.scrollY];
        });""")
    return {label: (value, dt_top, dd_top, bottom)
            for label, value, dt_top, dd_top, bottom in rows}


def _timeline(b: Browser) -> dict[str, str]:
    """Phase -> status as the machine page's timeline picture shows them now."""
    return b.driver.execute_script(
        "const out = {}; document.querySelectorAll('#boot-timeline g.phase')"
        ".forEach(g => { out[g.dataset.phase] = g.dataset.status; }); return out;")


def _row(b: Browser) -> tuple[str, str]:
    """(state, phase) as the progress page's row shows them now."""
    return (b.find('tr[data-lifecycle] [data-field="state"]').text,
            b.find('tr[data-lifecycle] [data-field="phase"]').text)


def test_log_in_reimage_watch_progress_and_log_out(browser: Browser,
                                                    rig: tuple[UiRig, Any]) -> None:
    from selenium.webdriver.support.ui import Select

    app, bmc = rig
    b = browser
    try:
        # -- log in: a page of the UI sends us to the login form, and back after it
        b.get("/ui/machines")
        b.wait_for("form.login")
        assert b.path() == "/ui/login?next=/ui/machines"
        b.find("input[name=name]").send_keys(USER)
        b.find("input[name=password]").send_keys(PASSWORD)
        b.shot("login")
        b.submit("form.login")
        assert b.path() == "/ui/machines", b.text()[:2000]

        # -- the list shows the machine, with its state
        row = b.wait_for(f'tr[data-mac="{MAC}"]')
        assert HOST in row.text and MAC in row.text
        before = app.machine()
        assert row.find_element("css selector", ".state").text == before["state"]
        b.shot("machines")

        # -- its page
        row.find_element("link text", HOST).click()
        b.wait_for("h1")
        assert b.path() == f"/ui/machines/{MAC}" and MAC in b.text()
        facts = _facts(b)
        assert facts["MAC"][0] == MAC and facts["BMC"][0].startswith("ipmi 127.0.0.1:")
        # each value is shown on its label's line (also when a value is empty)
        misplaced = {k: (dt_top, dd_top) for k, (_, dt_top, dd_top, _) in facts.items()
                     if abs(dt_top - dd_top) > 2}
        assert not misplaced, f"values beside other labels (label: its top, value's top): " \
            f"{misplaced}"
        assert b.find("h2").rect["y"] >= max(bottom for *_, bottom in facts.values())
        b.shot("machine")
        b.find("nav a").click()  # back to the list

        # -- the reimage form, from the list
        b.wait_for(f'input[type=checkbox][name=m][value="{MAC}"]').click()
        b.shot("machine-selected")
        b.submit("#machines-form")
        assert b.path() == f"/ui/reimage?m={MAC.replace(':', '%3A')}", b.path()
        assert f"Type {HOST} to confirm" in b.text()
        Select(b.find("select[name=bootenv]")).select_by_value("tiny")
        params = f"ssh_authorized_keys={json.dumps([KEY])}"
        b.find("textarea[name=params]").send_keys(params)
        b.find("input[name=reason]").send_keys("browser test")
        b.shot("reimage-form")

        # -- a wrong confirmation is refused, nothing changes, the form keeps its values
        b.find("input[name=confirm]").send_keys("web2")
        b.submit("form.reimage")
        alert = b.wait_for("[role=alert]")
        assert alert.text == f"confirm: type the machine's name, '{HOST}', to reimage"
        assert b.status() == 400
        assert b.find("textarea[name=params]").get_attribute("value") == params
        assert b.find("input[name=reason]").get_attribute("value") == "browser test"
        b.shot("wrong-confirmation")
        after = app.machine()
        assert (after["state"], after.get("phase"), after.get("deployment")) == \
            (before["state"], before.get("phase"), before.get("deployment"))

        # -- the right confirmation: the progress page, the machine waiting for its BMC
        b.find("input[name=confirm]").clear()
        b.find("input[name=confirm]").send_keys(HOST)
        b.submit("form.reimage")
        assert b.path().startswith("/ui/progress?m="), b.text()[:2000]
        b.wait_for('tr[data-lifecycle] [data-field="state"]')
        shown = _row(b)
        assert shown == ("provisioning", "power"), shown
        assert (app.machine()["state"], app.machine()["phase"]) == shown
        b.driver.execute_script("window.__marker = 1")
        b.shot("progress-waiting-for-bmc")

        # -- the power part takes the requests; the row changes without a reload
        app.start_power()
        try:
            netns.wait_for(lambda: _row(b) == ("provisioning", "boot"), PROGRESS_WAIT,
                           interval=0.5)
        except TimeoutError:
            raise AssertionError(f"the row still shows {_row(b)} after {PROGRESS_WAIT} s, "
                                 f"not provisioning/boot; the appliance has "
                                 f"{app.machine()['phase']!r}") from None
        assert b.driver.execute_script("return window.__marker") == 1, "the page reloaded"
        assert "waiting for the network boot" in b.find('[data-field="reason"]').text
        b.shot("progress-boot")
        machine = app.machine()
        assert (machine["state"], machine["phase"]) == ("provisioning", "boot")
        assert bmc.boot_device() == "pxe" and bmc.power() == "on"
        # one reimage (the refused form queued nothing), by alice, with the form's reason;
        # the simulated machine was off, so the driver's cycle turned it on
        assert bmc.calls(sets_only=True) == ["set boot pxe", "set power 1"]
        reimages = [e for e in app.events() if e["kind"] == "state"
                    and e["details"].get("step") == "reimage"]
        assert len(reimages) == 1 and reimages[0]["actor"] == f"user:{USER}", reimages
        assert "browser test" in reimages[0]["message"], reimages

        # -- the machine's page draws the run's timeline: the BMC's part done, the
        #    machine not booted from the network yet
        b.get(f"/ui/machines/{MAC}")
        b.wait_for("#boot-timeline")
        shown_phases = _timeline(b)
        assert (shown_phases["power"], shown_phases["dhcp"]) == ("done", "running"), \
            shown_phases
        b.driver.execute_script("window.__marker = 2")
        b.shot("timeline-waiting-for-boot")

        # -- it boots from the network (real DHCP and HTTP clients with its MAC): the
        #    timeline fills in on the page without a reload
        address = app.network_boot()
        want = {"power": "done", "dhcp": "done", "tftp": "skipped", "script": "done",
                "kernel": "done", "installer": "running", "reboot": "pending"}
        try:
            netns.wait_for(lambda: {k: v for k, v in _timeline(b).items() if k in want}
                           == want, 30, interval=0.5)
        except TimeoutError:
            raise AssertionError(f"the timeline shows {_timeline(b)}, not {want}; events: "
                                 f"{[(e['kind'], e['message']) for e in app.events()]}"
                                 ) from None
        assert b.driver.execute_script("return window.__marker") == 2, "the page reloaded"
        bars = b.driver.execute_script(
            "return Array.from(document.querySelectorAll('#boot-timeline g.phase rect'))"
            ".map(r => r.closest('g').dataset.phase)")
        assert bars == ["power", "dhcp", "script", "kernel", "installer"], bars
        assert f"ACK {address}" in b.find("table.timeline").text
        b.shot("timeline")
        kinds = [e["kind"] for e in app.events()]
        assert "dhcp" in kinds and kinds.count("download") == 2, kinds

        # -- the power buttons: identify needs no confirmation; power off asks first;
        #    the page follows each request to its outcome on the real BMC
        b.find("form.identify button[value=on]").click()
        b.wait_for("#queued")
        netns.wait_for(lambda: b.find("#queued").get_attribute("data-state") == "succeeded",
                       PROGRESS_WAIT, interval=0.5, what="identify to succeed on the page")
        assert bmc.identify() == "on"
        b.find("form.power button[value=off]").click()
        b.wait_for("form.confirm")
        assert b.find("form.confirm button").text == f"Yes, power off {HOST}"
        assert bmc.power() == "on"  # asked, not done
        b.shot("power-off-confirm")
        b.submit("form.confirm")
        netns.wait_for(lambda: b.find("#queued").get_attribute("data-state") == "succeeded",
                       PROGRESS_WAIT, interval=0.5, what="power off to succeed on the page")
        assert bmc.power() == "off"
        assert "succeeded" in b.find("table.requests tbody tr").text
        b.shot("powered-off")
        power_events = [e for e in app.events() if e["kind"] == "power"]
        assert [e["actor"] for e in power_events[-2:]] == [f"user:{USER}"] * 2, power_events

        # -- a form posted without its CSRF token is refused; nothing changes
        deployment = machine["deployment"]
        b.get(f"/ui/reimage?m={MAC}")
        b.wait_for("form.reimage")
        Select(b.find("select[name=bootenv]")).select_by_value("tiny")
        b.find("textarea[name=params]").send_keys(f"{params}\ntimezone=Europe/Paris")
        b.find("input[name=reason]").send_keys("no csrf token")
        b.find("input[name=confirm]").send_keys(HOST)
        b.driver.execute_script(
            "document.querySelector('form.reimage input[name=csrf_token]').remove()")
        assert not b.finds("form.reimage input[name=csrf_token]")
        b.submit("form.reimage")
        alert = b.wait_for("[role=alert]")
        assert "CSRF" in alert.text and b.status() == 403, b.text()[:2000]
        b.shot("no-csrf-refused")
        assert app.machine()["deployment"] == deployment

        # -- log out: the session ends
        b.get("/ui/machines")
        b.wait_for("form.logout")
        b.submit("form.logout")
        assert b.path().startswith("/ui/login"), b.path()
        b.shot("logged-out")
        b.get("/ui/machines")
        b.wait_for("form.login")
        assert b.path().startswith("/ui/login?next=")
    except BaseException:
        try:
            shot = b.shot("FAILED")
            (shot.with_suffix(".html")).write_text(b.driver.page_source)
        except Exception:  # the browser may be the thing that failed
            pass
        raise
