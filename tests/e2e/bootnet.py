"""The isolated boot network of the VM tests: a namespace with a bridge, the appliance
serving DHCP, TFTP, HTTP (and syslog) on it, nothing else, no route out."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests import netns
from tests.conftest import ApplianceProcess

SUBNET = "10.250.40.0/24"
POOL = "10.250.40.100-10.250.40.200"
SERVER = "10.250.40.1"
HTTP_PORT = 8080
SYSLOG_PORT = 514
BRIDGE = "apbr0"
BASE_URL = f"http://{SERVER}:{HTTP_PORT}"

CONFIG = """\
state_dir = "{state_dir}"
log_level = "INFO"

[http]
port = {port}
public_address = "{server}"
access_log = true

[tftp]
root = "/usr/lib/ipxe"

[dhcp]
interface = "{bridge}"
mode = "server"

[boot]
reload_ipxe_bios = true
"""


@dataclass
class BootNet:
    ns: netns.Namespace
    appliance: ApplianceProcess
    workdir: Path
    state_dir: Path


def _listening(ns: netns.Namespace) -> bool:
    udp = ns.exec(["ss", "-Hlnu"], check=False).stdout
    tcp = ns.exec(["ss", "-Hlnt"], check=False).stdout
    return (re.search(r":67\s", udp) is not None and re.search(r":69\s", udp) is not None
            and re.search(rf":{HTTP_PORT}\s", tcp) is not None)


@contextmanager
def serving(ns: netns.Namespace, workdir: Path, images: dict[str, Path],
            before_start=None, subnet_options: tuple[str, ...] = ()  # type: ignore[no-untyped-def]
            ) -> Iterator[BootNet]:
    """The appliance serving the boot network in ``ns``, with ``images`` (path relative to
    the images directory -> file to copy) in place; ``before_start(app)`` runs CLI setup;
    ``subnet_options`` go to ``subnet add`` (e.g. ``--router``)."""
    netns.bridge(ns, BRIDGE, f"{SERVER}/24")
    state_dir = workdir / "state"
    for rel, source in images.items():
        target = state_dir / "images" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    state_dir.mkdir(parents=True, exist_ok=True)
    app = ApplianceProcess(ns, workdir, CONFIG.format(
        state_dir=state_dir, port=HTTP_PORT, server=SERVER, bridge=BRIDGE))
    app.cli("db", "upgrade")
    app.cli("subnet", "add", SUBNET, "--pool", POOL, "--next-server", SERVER,
            "--lease-time", "600", *subnet_options)
    if before_start is not None:
        before_start(app)
    app.start()
    try:
        netns.wait_for(lambda: _listening(ns) or (app.proc is not None
                                                 and app.proc.poll() is not None),
                       60, interval=0.5, what="DHCP, TFTP and HTTP listening")
        assert app.proc is not None and app.proc.poll() is None, (
            f"appliance exited:\n{app.log()[-3000:]}")
        assert app.http_get(f"{BASE_URL}/healthz").strip() == b"ok"
        yield BootNet(ns, app, workdir, state_dir)
    finally:
        app.stop()
