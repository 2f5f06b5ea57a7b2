"""The boot timeline built from a machine's events (appliance/timeline.py)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pytest

from appliance import timeline

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 11, 22, 3, 0, 0)


@dataclass
class Ev:
    id: int
    at: dt.datetime
    kind: str
    message: str = ""
    details: dict[str, Any] | None = field(default=None)


class Run:
    """Events at seconds after T0, ids in the order they are added."""

    def __init__(self) -> None:
        self.events: list[Ev] = []

    def add(self, second: float, kind: str, message: str = "", **details: Any) -> Run:
        self.events.append(Ev(len(self.events) + 1, T0 + dt.timedelta(seconds=second), kind,
                              message or kind, details or None))
        return self

    def step(self, second: float, step: str, **details: Any) -> Run:
        return self.add(second, "state", f"step {step}", step=step, **details)

    def at(self, second: float) -> dt.datetime:
        return T0 + dt.timedelta(seconds=second)


def _by_key(t: timeline.Timeline) -> dict[str, timeline.Phase]:
    return {p.key: p for p in t.phases}


def _bios_run_until_ready() -> Run:
    """A BIOS machine whose iPXE ROM reloads undionly.kpxe over TFTP, then a deploy."""
    return (Run()
            .add(-50, "discovered")
            .step(0, "reimage", phase="power", bootenv="image-deploy", deployment=3)
            .add(1, "power", "boot pxe done").add(2, "power", "power cycle done")
            .step(2, "power-done")
            .add(20, "dhcp", "ACK 10.0.0.5 (PXE)", type="ack")
            .add(21, "boot-script", "served boot script").step(21, "booted")
            .add(23, "tftp", "sent undionly.kpxe", ok=True)
            .add(27, "dhcp", "ACK 10.0.0.5 (iPXE)", type="ack")
            .add(29, "boot-script", "served boot script")
            .add(35, "download", "vmlinuz", role="kernel")
            .add(41, "download", "initrd.img", role="initrd")
            .add(60, "checkin", "deploy started")
            .add(90, "download", "debian.raw.zst", role="file")
            .step(170, "install-done")
            .add(200, "dhcp", "ACK 10.0.0.5 (PXE)", type="ack")
            .add(250, "user-data", "served user-data (nocloud)")
            .step(330, "phone-home", hostname="web1")
            .step(332, "contract-passed"))


def test_a_machine_never_reimaged_has_no_timeline() -> None:
    t = timeline.build(Run().add(0, "discovered").events)
    assert t.outcome == "none" and t.phases == []


def test_a_run_to_ready_tiles_every_phase_in_order() -> None:
    run = _bios_run_until_ready()
    t = timeline.build(run.events)
    assert t.outcome == "ready" and t.bootenv == "image-deploy" and t.deployment == 3
    phases = _by_key(t)
    assert [p.key for p in t.phases] == [k for k, _ in timeline.PHASES]
    assert all(p.status == "done" for p in t.phases)
    seconds = {k: p.seconds for k, p in phases.items()}
    assert seconds == {"power": 2.0, "dhcp": 18.0, "tftp": 3.0, "script": 6.0, "kernel": 12.0,
                       "installer": 129.0, "reboot": 80.0, "cloud-init": 80.0,
                       "phone-home": 0.0, "contract": 2.0}
    assert sum(s for s in seconds.values() if s) == t.seconds == 332.0
    assert phases["installer"].label == "deploy"
    assert phases["phone-home"].detail == "phoned home as web1"
    # phases tile: each starts where the one before ended
    for before, after in zip(t.phases, t.phases[1:], strict=False):
        assert after.start == before.end


def test_the_last_run_only() -> None:
    run = _bios_run_until_ready()
    run.step(400, "reimage", phase="power", bootenv="debian-12", deployment=4)
    t = timeline.build(run.events, now=run.at(430))
    assert t.outcome == "running" and t.bootenv == "debian-12" and t.started == run.at(400)
    phases = _by_key(t)
    assert phases["power"].status == "running" and phases["power"].seconds == 30.0
    assert all(p.status == "pending" for p in t.phases[1:])
    assert phases["installer"].label == "installer"


def test_a_firmware_that_chains_the_script_directly_skips_tftp() -> None:
    run = (Run().step(0, "reimage", phase="power", bootenv="image-deploy")
           .step(3, "power-done")
           .add(15, "dhcp", "ACK", type="ack")
           .add(16, "boot-script", "served boot script").step(16, "booted")
           .add(20, "download", "vmlinuz", role="kernel")
           .add(24, "download", "initrd", role="initrd"))
    phases = _by_key(timeline.build(run.events, now=run.at(30)))
    assert phases["tftp"].status == "skipped" and phases["tftp"].seconds is None
    assert phases["script"].status == "done" and phases["script"].start == run.at(15)
    assert phases["kernel"].status == "done" and phases["kernel"].seconds == 8.0
    assert phases["installer"].status == "running" and phases["installer"].seconds == 6.0


def test_stuck_waiting_for_dhcp_is_running_with_the_wait_so_far() -> None:
    run = (Run().step(0, "reimage", phase="power", bootenv="image-deploy")
           .step(2, "power-done")
           .add(5, "dhcp", "OFFER 10.0.0.9", type="offer"))
    t = timeline.build(run.events, now=run.at(302))
    phases = _by_key(t)
    assert phases["power"].status == "done"
    assert (phases["dhcp"].status, phases["dhcp"].seconds) == ("running", 300.0)
    assert phases["dhcp"].detail == "OFFER 10.0.0.9"   # what was seen last
    assert [p.status for p in t.phases[2:]] == ["pending"] * 8


def test_a_kernel_without_its_initrd_yet_is_still_downloading() -> None:
    run = (Run().step(0, "reimage", phase="boot", bootenv="debian-12")
           .add(10, "dhcp", "ACK", type="ack")
           .add(11, "tftp", "sent ipxe.efi", ok=True)
           .add(13, "boot-script", "served").step(13, "booted")
           .add(20, "download", "linux", role="kernel"))
    phases = _by_key(timeline.build(run.events, now=run.at(25)))
    assert phases["power"].status == "skipped"      # no BMC: powered on by hand
    assert phases["dhcp"].start == run.at(0) and phases["dhcp"].seconds == 10.0
    assert phases["tftp"].status == "done" and phases["script"].status == "done"
    assert (phases["kernel"].status, phases["kernel"].seconds) == ("running", 12.0)


def test_a_failed_bmc_fails_the_power_phase_and_says_why() -> None:
    run = (Run().step(0, "reimage", phase="power", bootenv="image-deploy")
           .add(4, "power-failed", "power cycle failed after 2 attempts: timeout")
           .step(5, "fail", reason="BMC power failed"))
    t = timeline.build(run.events, now=run.at(500))
    phases = _by_key(t)
    assert t.outcome == "failed" and t.seconds == 5.0
    assert phases["power"].status == "failed" and phases["power"].seconds == 5.0
    assert "power cycle failed after 2 attempts: timeout" in phases["power"].problems
    assert all(p.status == "pending" for p in t.phases[1:])


def test_a_failed_tftp_transfer_is_a_problem_of_the_tftp_phase() -> None:
    run = (Run().step(0, "reimage", phase="boot", bootenv="image-deploy")
           .add(10, "dhcp", "ACK", type="ack")
           .add(14, "tftp", "transfer of undionly.kpxe failed", ok=False))
    phases = _by_key(timeline.build(run.events, now=run.at(60)))
    assert phases["tftp"].status == "running"
    assert phases["tftp"].problems == ["transfer of undionly.kpxe failed"]


def test_a_decommissioned_run_has_ended() -> None:
    run = (Run().step(0, "reimage", phase="boot", bootenv="image-deploy")
           .step(8, "decommission"))
    t = timeline.build(run.events, now=run.at(100))
    assert t.outcome == "ended" and t.seconds == 8.0
    assert _by_key(t)["dhcp"].status == "ended"


def test_as_dict_is_plain_json() -> None:
    import json

    data = timeline.build(_bios_run_until_ready().events).as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["phases"][0] == {"phase": "power", "label": "power", "status": "done",
                                 "start": "2026-11-22T03:00:00", "end": "2026-11-22T03:00:02",
                                 "seconds": 2.0, "detail": "next boot set, power cycled",
                                 "problems": []}


def test_events_written_late_with_their_packet_time_count_when_they_happened() -> None:
    """The DHCP part writes its exchanges a moment after the packets (ids out of time
    order); a packet just before the reimage does not count for this run."""
    run = (Run().step(0, "reimage", phase="boot", bootenv="image-deploy")
           .add(-1, "dhcp", "ACK from before", type="ack")
           .add(20, "boot-script", "served").step(20, "booted")
           .add(18, "dhcp", "ACK 10.0.0.5", type="ack")
           .add(25, "download", "linux", role="kernel")
           .add(27, "download", "initrd", role="initrd"))
    phases = _by_key(timeline.build(run.events, now=run.at(30)))
    assert (phases["dhcp"].seconds, phases["dhcp"].detail) == (18.0, "ACK 10.0.0.5")
    assert phases["script"].seconds == 2.0 and phases["kernel"].seconds == 7.0
