import pytest

from appliance import inventory
from appliance.db import Database
from appliance.inventory import InventoryError


@pytest.fixture
def db(tmp_path) -> Database:  # type: ignore[no-untyped-def]
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    db.migrate()
    return db


def test_subnet_and_reservation(db: Database) -> None:
    with db.session() as s:
        inventory.add_subnet(s, "10.1.0.0/24", pool="10.1.0.100-10.1.0.200",
                             router="10.1.0.1", dns=["10.1.0.1"])
        inventory.add_reservation(s, "52-54-00-AA-BB-CC", "10.1.0.5", "node1")
    with db.session() as s:
        (res,) = inventory.list_reservations(s)
        assert (res.mac, res.ip, res.hostname) == ("52:54:00:aa:bb:cc", "10.1.0.5", "node1")
        kinds = [e.kind for e in inventory.list_events(s)]
        assert kinds == ["subnet-added", "reservation-added"]


@pytest.mark.parametrize("kwargs, message", [
    ({"network": "10.1.0.1/24"}, "network: '10.1.0.1/24'"),
    ({"network": "10.1.0.0/24", "pool": "10.1.0.200-10.1.0.100"}, "comes after"),
    ({"network": "10.1.0.0/24", "pool": "10.1.0.0-10.1.0.100"}, "network or broadcast"),
    ({"network": "10.1.0.0/24", "pool": "10.2.0.1-10.2.0.5"}, "not in 10.1.0.0/24"),
    ({"network": "10.1.0.0/24", "pool": "10.1.0.1"}, "FIRST-LAST"),
    ({"network": "10.1.0.0/24", "router": "10.9.9.9"}, "router: 10.9.9.9 is not in"),
    ({"network": "10.1.0.0/24", "dns": ["ns1"]}, "dns: 'ns1'"),
    ({"network": "10.1.0.0/24", "lease_seconds": 5}, "lease-time"),
])
def test_bad_subnets_are_refused(db: Database, kwargs: dict, message: str) -> None:
    with db.session() as s, pytest.raises(InventoryError, match=message):
        inventory.add_subnet(s, **kwargs)


def test_overlap_and_unknown_subnet_refused(db: Database) -> None:
    with db.session() as s:
        inventory.add_subnet(s, "10.1.0.0/24")
    with db.session() as s, pytest.raises(InventoryError, match="overlaps"):
        inventory.add_subnet(s, "10.1.0.128/25")
    with db.session() as s, pytest.raises(InventoryError, match="in no configured subnet"):
        inventory.add_reservation(s, "52:54:00:00:00:01", "10.7.0.1")
    with db.session() as s, pytest.raises(InventoryError, match="mac: not a MAC"):
        inventory.add_reservation(s, "52:54:00:00:00", "10.1.0.9")
