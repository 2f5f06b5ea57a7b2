"""The boot endpoints through Flask's test client (the real HTTP server is tested in
tests/integration/test_http_boot.py)."""

from pathlib import Path

import pytest

from appliance.config import Config
from appliance.db import Database
from appliance.web import create_app


@pytest.fixture
def app(tmp_path: Path):  # type: ignore[no-untyped-def]
    config = Config(state_dir=str(tmp_path))
    images = config.images_dir / "discovery"
    images.mkdir(parents=True)
    (images / "vmlinuz").write_bytes(bytes(range(256)) * 4)
    (images / "initrd.img").write_bytes(b"initrd")
    for work_file in ("vmlinuz.part", "../.locks/discovery", "../.staging-1/vmlinuz"):
        (images / work_file).parent.mkdir(exist_ok=True)
        (images / work_file).write_bytes(b"work file")
    db = Database(config.effective_database_url)
    db.migrate()
    app = create_app(config, db)
    app.testing = True
    return app


def test_unknown_mac_is_discovered_and_boots_discovery(app) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    body = client.get("/boot/52-54-00-12-34-56.ipxe", base_url="http://10.0.0.1:8080").text
    assert body.startswith("#!ipxe\n")
    assert "kernel http://10.0.0.1:8080/images/discovery/vmlinuz initrd=initrd.img" in body
    assert "appliance.mac=52:54:00:12:34:56" in body
    assert "initrd --name initrd.img http://10.0.0.1:8080/images/discovery/initrd.img" in body
    assert "{{" not in body and "\n\n\n" not in body
    from appliance import inventory
    with app.extensions["appliance"].db.session() as s:
        (machine,) = inventory.list_machines(s)
        assert machine.mac == "52:54:00:12:34:56"
        assert machine.state == "discovered"
        kinds = [e.kind for e in inventory.list_events(s)]
    assert kinds == ["discovered", "boot-script"]


def test_unknown_bootenv_gives_an_error_script(app) -> None:  # type: ignore[no-untyped-def]
    client = app.test_client()
    client.get("/boot/52:54:00:00:00:01.ipxe")
    db = app.extensions["appliance"].db
    from appliance.models import Machine
    with db.session() as s:
        s.query(Machine).one().bootenv = "no-such-env"
    body = client.get("/boot/52:54:00:00:00:01.ipxe").text
    assert "boot environment 'no-such-env' is not defined" in body
    assert "sleep 60" in body and "chain --autofree" in body


def test_reload_ipxe_bios_chains_undionly(app) -> None:  # type: ignore[no-untyped-def]
    app.extensions["appliance"].config.boot.reload_ipxe_bios = True
    body = app.test_client().get("/boot/52:54:00:00:00:02.ipxe",
                                 base_url="http://10.0.0.1:8080").text
    assert "iseq ${netX/chip} undionly && goto ipxe_ready" in body
    assert "chain --autofree tftp://10.0.0.1/undionly.kpxe" in body


def test_local_boot_skips_the_reload_and_boots_the_first_disk(app) -> None:  # type: ignore[no-untyped-def]
    app.extensions["appliance"].config.boot.reload_ipxe_bios = True
    client = app.test_client()
    client.get("/boot/52:54:00:00:00:03.ipxe")
    db = app.extensions["appliance"].db
    from appliance.models import Machine
    with db.session() as s:
        s.query(Machine).filter_by(mac="52:54:00:00:00:03").one().bootenv = "local"
    body = client.get("/boot/52:54:00:00:00:03.ipxe", base_url="http://10.0.0.1:8080").text
    assert "undionly" not in body
    assert "sanboot --no-describe --drive 0x80 || goto retry" in body
    assert body.index("iseq ${platform} efi && goto local_efi") < body.index("sanboot")


def test_bad_mac_is_404(app) -> None:  # type: ignore[no-untyped-def]
    assert app.test_client().get("/boot/zz.ipxe").status_code == 404


@pytest.mark.parametrize("header, status, body_range", [
    (None, 200, (0, 1024)),
    ("bytes=10-19", 206, (10, 20)),
    ("bytes=1000-", 206, (1000, 1024)),
    ("bytes=-24", 206, (1000, 1024)),
    ("bytes=1000-5000", 206, (1000, 1024)),
    ("bytes=2000-", 416, None),
    ("bytes=1-2,5-6", 200, (0, 1024)),
])
def test_images_range(app, header, status, body_range) -> None:  # type: ignore[no-untyped-def]
    headers = {"Range": header} if header else {}
    resp = app.test_client().get("/images/discovery/vmlinuz", headers=headers)
    assert resp.status_code == status
    data = bytes(range(256)) * 4
    if body_range:
        assert resp.data == data[body_range[0]:body_range[1]]
        assert resp.headers["Content-Length"] == str(body_range[1] - body_range[0])
    else:
        assert resp.headers["Content-Range"] == "bytes */1024"


@pytest.mark.parametrize("path", ["/images/../appliance.db", "/images/%2e%2e/appliance.db",
                                  "/images/discovery/../../appliance.db", "/images/discovery",
                                  "/images/nothing", "/images/discovery/vmlinuz.part",
                                  "/images/.locks/discovery", "/images/.staging-1/vmlinuz"])
def test_images_outside_root_or_missing_is_404(app, path) -> None:  # type: ignore[no-untyped-def]
    assert app.test_client().get(path).status_code == 404


def test_generic_script_chains_by_mac(app) -> None:  # type: ignore[no-untyped-def]
    body = app.test_client().get("/boot.ipxe", base_url="http://10.0.0.1:8080").text
    assert body == "#!ipxe\nchain --autofree http://10.0.0.1:8080/boot/${mac}.ipxe\n"
