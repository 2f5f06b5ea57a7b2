"""Simulated IPMI BMCs for tests and benchmarks: a fleet of OpenIPMI ``ipmi_sim`` processes.

``start_fleet(workdir, count)`` starts ``count`` ipmi_sim BMCs on 127.0.0.1 (of the host,
or of a :class:`tests.netns.Namespace`), one UDP port each, user ``admin`` with the given
password, IPMI 2.0 (lanplus) and 1.5. Each BMC has its own directory under ``workdir``
(``bmc-NNN/``: lan.conf, bmc.emu, ipmi_sim's state dir, its log ``ipmi_sim.log``) and
its own ``chassis-control`` program (POSIX sh) that ipmi_sim runs for every power,
boot-device, reset, soft-off and identify request. That program keeps the "machine" in
files of the BMC's directory and appends each call, with a timestamp, to ``calls.log``,
so a test reads what the BMC was told independently of any client::

    power     0 or 1                  boot      ipmi_sim's device name (see below)
    identify  "<interval> <force>"    resets    one line per reset
    soft      obey | ignore | <ms>    fail      injected failure ("set power", "boot", ...)

``running_fleet(...)`` is the context manager that always stops every process it
started, by PID (never by name). Startup launches all processes at once, then waits for
each to answer an RMCP presence ping (a bounded wait; on failure the error carries the
ipmi_sim log) and logs in once with ipmitool (``mc info``: no chassis call, so
``calls.log`` starts empty).

What ipmi_sim (Debian openipmi 2.0.33, ``lanserv/bmc_chassis.c``) does, checked
against the source and with ipmitool 1.8.19 / pyghmi 1.6.19:

Chassis control program. ipmi_sim runs ``popen("<prog> get power")`` /
``"<prog> set power 1"`` etc. (no MC argument: the ``chassis_control`` string is used
as is), synchronously in its single event loop, and reads ``name:value`` lines from a
get. A program exiting non-zero, or a get answer it cannot parse, gives completion code
0xff. Values: power ``0``/``1``; boot a name (below); reset/shutdown ``1``; identify
``"<interval> <force>"``.

Boot flags, Set System Boot Options parameter 5: ipmi_sim takes only the device selector
(byte 2 bits 5:2) and maps it to a name: 0 ``none`` (no override), 1 ``pxe``, 2
``default`` (which is IPMI's *force boot from default hard drive*, i.e. ``disk``), 5
``cdrom``, 6 ``bios`` (BIOS setup); it calls ``set boot <name>``. Any other selector
(3 safe mode, 4 diagnostic, 7 remote floppy/USB, ...) has no name and fails with 0xff
(``ipmitool chassis bootdev safe``: "Unspecified error", yet ipmitool 1.8.19 exits 0
after a failed ``bootdev``: check its stderr, not only its status). Byte 1 (valid bit 7,
persistent bit 6, EFI bit 5) and bytes 3-5 are ignored: not stored, not passed on, so
no test can observe the persistent or EFI bit through ipmi_sim. Fewer than 5 data
bytes: 0xc7.

Get System Boot Options parameter 5 calls ``get boot`` and answers ``01 05 00 <sel<<2>
00 00 00``: the device the program reports (its name prefix-matched against the table
above; an unknown name gives 0xff), but byte 1 is always 0: boot flag *invalid*, next
boot only, legacy BIOS. ``ipmitool chassis bootparam get 5`` therefore prints "Boot Flag
Invalid", "Options apply to only next boot", "BIOS PC Compatible (legacy) boot" and
"Boot Device Selector : Force PXE". So the device does read back (fed by this program's
``get boot`` answer), but valid, persistent and EFI never do. pyghmi's ``get_bootdev()``
returns ``{'bootdev': 'default', 'persistent': True}`` whenever the valid bit is clear,
before looking at the device: against ipmi_sim it reads "default" after any set, whatever
``get boot`` answers. A driver that trusts the valid bit sees "no override" here.

Parameter 3 (boot flag valid bit clearing, the BMC's 60 s timer): set is accepted and
ignored (completion 0, no program call); get gives 0xcc. ipmi_sim has no valid-bit timer
at all: nothing ever clears the device. Parameter 4 (boot info acknowledge): a set runs
``get boot`` (a bug: it reads instead of acknowledging) and discards the answer; that is
the ``get boot`` logged before each ``set boot`` from ``ipmitool chassis bootdev``;
get answers ``01 04`` with no data. Parameter 1 (set in progress): set ignored, get
``01 01 00``. Other parameters: 0xcc. pyghmi's ``set_bootdev`` sends parameter 3 (data
0x08, ignored) and then 5; its ``set_bootdev('default')`` sends selector 0: ``set boot
none``.

Chassis control (netfn 0 cmd 2): 0 off ``set power 0``; 1 on ``set power 1`` (also when
already on); 2 power cycle: ``set power 0``, answers at once, then a 1 s timer runs
``get power`` and, once that reads 0, ``set power 1`` (retrying each second while the
program still says on). So a cycle powers on a machine that was off, about 1 s later,
and power status reads "off" in between; an off or on request inside that second
cancels the pending power-on. 3 hard reset: ``set reset 1`` only (power untouched, not
even checked). 5 soft shutdown: ``set shutdown 1`` only (what happens to power is the
program's business: here the ``soft`` file). 4 diagnostic interrupt: 0xcc. pyghmi has no
cycle: its ``set_power('boot')`` sends reset (3) when on and on (1) when off, and
``set_power('on')`` when already on sends nothing; a driver needs raw ``0x00 0x02
[0x02]`` for a real cycle.

Chassis identify (netfn 0 cmd 4): ``set identify "<interval> <force>"``: no data ->
``15 0`` (ipmitool ``chassis identify``), ``identify 0`` -> ``0 0``, ``identify force``
and pyghmi ``set_identify(on=True)`` -> ``0 1``, pyghmi ``on=False`` -> ``0 0``. Get
Chassis Status answers 4 bytes: the power bit from ``get power``, last power event 0,
misc state 0 (identify state not reported, "identify supported" bit clear); it runs
``get power`` every time (so each power status is one program call).

Cipher suites (RMCP+): ipmi_sim implements RAKP-HMAC-SHA1/MD5, HMAC-SHA1-96/MD5-128
integrity, AES-CBC-128; no SHA-256, so **no suite 17**. With ipmitool: suites 0, 1, 2,
3, 6 work; 4, 5, 9, 10, 13, 14 are refused ("invalid confidentiality algorithm": no
xRC4); 7 and 8 open a session but fail at Set Session Privilege Level; 11 and 12 make
ipmitool abort; 15-17 are refused ("invalid authentication algorithm"). **Suite 0 accepts
any password** (no authentication), so wrong-password tests must use suite >= 1.
pyghmi asks for suite 17 first, is refused, and falls back to 3. ``-I lan`` (IPMI 1.5,
md5) works too.

Resources: one ipmi_sim uses ~3.6 MiB RSS at start (~6 MiB after ~40 sessions);
200 start in parallel and all answer a ping in under a second. ipmitool against an
unanswering port gives up after ~20 s by default (``-N 1 -R 4``), ~2 s with ``-N 1 -R 1``;
one ``ipmitool chassis power status`` is 11 request/response exchanges (login, command,
logout), one status through the appliance's pyghmi driver 7 plus the logout.

Two more quirks: ipmi_sim binds its UDP port with SO_REUSEADDR, so a second ipmi_sim on
an already used port starts silently and shares it (ports here are checked free with a
plain bind just before each start); and with ``-s`` it stores changed users and LAN
parameters under ``<state>/ipmi_sim/<name>/``, which would then override lan.conf (each
start here uses a fresh state directory).
"""

from __future__ import annotations

import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from appliance.power.driver import BmcAccess
from tests.netns import Namespace

if TYPE_CHECKING:
    from tests.conftest import ApplianceProcess

USER = "admin"
DEFAULT_PASSWORD = "sim-Passw0rd"
HOST = "127.0.0.1"
#: ipmi_sim's boot device names -> the driver's (:data:`appliance.power.driver.BOOT_DEVICES`).
BOOT_NAMES = {"none": "default", "pxe": "pxe", "default": "disk", "cdrom": "cdrom",
              "bios": "bios-setup"}
#: RMCP/ASF presence ping (ASF message 0x80, tag 0x01); ipmi_sim answers a pong (0x40).
RMCP_PING = bytes([0x06, 0x00, 0xFF, 0x06, 0x00, 0x00, 0x11, 0xBE, 0x80, 0x01, 0x00, 0x00])

T = TypeVar("T")


class SimError(RuntimeError):
    """A simulated BMC did not start, or an ipmitool call against it failed."""


class IpmitoolError(SimError):
    def __init__(self, cmd: Sequence[str], result: subprocess.CompletedProcess) -> None:
        self.returncode = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr
        super().__init__(f"ipmitool {' '.join(cmd)} exited {result.returncode}: "
                         f"{(result.stderr or result.stdout).strip()}")


# --- network namespaces for threads -------------------------------------------------------

_CLONE_NEWNET = 0x40000000


def enter_netns(name: str) -> None:
    """Move the *calling thread* into network namespace ``name`` (``ip netns`` name).

    Linux namespaces are per thread, so a dedicated thread can open sockets inside a test
    namespace while the rest of the process stays where it is. Never call this on the main
    thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(ns: Namespace | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` with its sockets in ``ns`` (a short-lived thread); ``ns=None``: here."""
    if ns is None:
        return fn()
    box: dict[str, object] = {}

    def target() -> None:
        try:
            enter_netns(ns.name)
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e

    t = threading.Thread(target=target, name=f"netns-{ns.name}", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


# --- ports ----------------------------------------------------------------------------------

def _port_free(port: int, host: str = HOST) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((host, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def pick_ports(count: int, base_port: int | None = None, avoid: Sequence[int] = (),
               ns: Namespace | None = None) -> list[int]:
    """``count`` UDP ports free on 127.0.0.1 (of ``ns``), outside the ephemeral range.

    With ``base_port``: ``base_port``, ``base_port+1``, ... must all be free (else an
    error). Without: a run of free ports from a random start in 10000..ephemeral-low, so
    parallel fleets and clients' ephemeral source ports do not collide.
    """
    def pick() -> list[int]:
        if base_port is not None:
            ports = list(range(base_port, base_port + count))
            busy = [p for p in ports if p in avoid or not _port_free(p)]
            if busy:
                raise SimError(f"UDP ports {busy[:10]} on {HOST} are in use")
            return ports
        lo = 10000
        hi = min(_ephemeral_range()[0], 65536) - 1
        if hi < lo + 4 * count:
            hi = 65535
        start = random.randrange(lo, hi + 1)
        ports: list[int] = []
        for p in [*range(start, hi + 1), *range(lo, start)]:
            if p not in avoid and _port_free(p):
                ports.append(p)
                if len(ports) == count:
                    return ports
        raise SimError(f"not {count} free UDP ports in {lo}..{hi}")

    return in_netns(ns, pick)


# --- the chassis control program -------------------------------------------------------------

_CHASSIS_CONTROL = r"""#!/bin/sh
# chassis_control for one ipmi_sim BMC (written by tests/ipmisim.py; test tooling only).
# ipmi_sim runs:  PROG get power|boot ...   (answers "power:0|1", "boot:<name>")
#                 PROG set power 0|1 | boot <name> | reset 1 | shutdown 1 | identify "<i> <f>"
D=@DIR@
ns=$(date +%s%N)
s=${ns%?????????}
echo "$s.${ns#"$s"} $*" >> "$D/calls.log"
op=$1; shift
if [ -r "$D/fail" ]; then                      # injected failure: "[get|set] <param>"
  read -r f1 f2 < "$D/fail"
  if [ -n "$f2" ]; then fop=$f1; fpar=$f2; else fop=$op; fpar=$f1; fi
  if [ "$fop" = "$op" ]; then
    for a in "$@"; do [ "$a" = "$fpar" ] && { echo "injected failure: $op $fpar"; exit 1; }; done
  fi
fi
if [ "$op" = get ]; then
  for n in "$@"; do
    case $n in
      power)
        if [ -r "$D/off_at" ]; then             # a delayed soft-off falls due
          read -r t < "$D/off_at"
          [ "$ns" -ge "$t" ] && { echo 0 > "$D/power"; rm -f "$D/off_at"; }
        fi
        read -r p < "$D/power"; echo "power:$p";;
      boot) read -r b < "$D/boot"; echo "boot:$b";;
      *) echo "cannot get $n"; exit 1;;
    esac
  done
  exit 0
fi
[ "$op" = set ] || { echo "unknown operation $op"; exit 1; }
while [ $# -ge 2 ]; do
  case $1 in
    power) echo "$2" > "$D/power"; rm -f "$D/off_at";;
    boot) echo "$2" > "$D/boot";;
    reset) echo "$ns" >> "$D/resets";;
    shutdown)
      read -r soft < "$D/soft"
      case $soft in
        obey) echo 0 > "$D/power";;
        ignore) ;;
        *) read -r p < "$D/power"; [ "$p" = 1 ] && echo $((ns + soft * 1000000)) > "$D/off_at";;
      esac;;
    identify) echo "$2" > "$D/identify";;
    *) echo "cannot set $1"; exit 1;;
  esac
  shift 2
done
exit 0
"""

_LAN_CONF = """\
name "{name}"
set_working_mc 0x20
  startlan 1
    addr {host} {port}
    priv_limit admin
    allowed_auths_callback none md2 md5 straight
    allowed_auths_user none md2 md5 straight
    allowed_auths_operator none md2 md5 straight
    allowed_auths_admin none md2 md5 straight
    guid {guid}
  endlan
  chassis_control "{prog}"
user 2 true "{user}" "{password}" admin 10 none md2 md5 straight
"""

_EMU = """\
mc_setbmc 0x20
mc_add 0x20 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable 0x20 1000 0x0a
mc_enable 0x20
"""


def _check_safe(text: str, what: str) -> None:
    bad = set(text) & set("\"'\\$`\n\r\t ")
    if bad or not text.isprintable():
        raise ValueError(f"{what} {text!r} contains characters lan.conf/sh cannot carry")


# --- one BMC ----------------------------------------------------------------------------------

@dataclass
class SimBmc:
    """One running ipmi_sim BMC and the files its chassis control program keeps."""

    index: int
    port: int
    password: str
    dir: Path
    ns: Namespace | None = None
    host: str = HOST
    proc: subprocess.Popen | None = field(default=None, repr=False)

    # -- lifecycle
    @property
    def pid(self) -> int:
        if self.proc is None:
            raise SimError(f"BMC {self.index} is not running")
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.dir / "ipmi_sim.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _write_config(self) -> None:
        _check_safe(self.password, "password")
        if len(self.password.encode()) > 20:
            raise ValueError("IPMI 2.0 passwords are at most 20 bytes")
        prog = self.dir / "chassis-control"
        _check_safe(str(prog), "path")
        (self.dir / "state").mkdir(parents=True, exist_ok=True)
        prog.write_text(_CHASSIS_CONTROL.replace("@DIR@", str(self.dir)))
        prog.chmod(0o755)
        (self.dir / "lan.conf").write_text(_LAN_CONF.format(
            name=f"bmc{self.index:03d}", host=self.host, port=self.port,
            guid=f"a1230000{self.index:08x}0123456789abcdef",
            prog=prog, user=USER, password=self.password))
        (self.dir / "bmc.emu").write_text(_EMU)

    def _launch(self) -> None:
        cmd = ["ipmi_sim", "-c", str(self.dir / "lan.conf"), "-f", str(self.dir / "bmc.emu"),
               "-s", str(self.dir / "state"), "-n"]
        if self.ns is not None:
            self.proc = self.ns.popen(cmd, log=self.log_path)
        else:
            with open(self.log_path, "ab") as out:
                self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)   # its own session: ipmi_sim + its popen children
            except ProcessLookupError:
                pass

    def stop(self, timeout: float = 5.0) -> None:
        """Stop this BMC's process (by its PID), wait for it; idempotent."""
        if self.proc is None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(5)
        if self.ns is not None and self.proc in self.ns.procs:
            self.ns.procs.remove(self.proc)
        self.proc = None

    def restart(self, timeout: float = 10.0) -> None:
        """Stop and start ipmi_sim again on the same port (sessions are lost, the machine's
        files stay): a BMC reboot."""
        self.stop()
        shutil.rmtree(self.dir / "state", ignore_errors=True)
        (self.dir / "state").mkdir()
        self._launch()
        _wait_ready([self], timeout)

    # -- what the BMC was told / the machine's state
    def _read(self, name: str, default: str = "") -> str:
        try:
            return (self.dir / name).read_text().strip()
        except FileNotFoundError:
            return default

    def power(self) -> str:
        """``on`` or ``off``: the chassis control program's power file."""
        return "on" if self._read("power", "0") == "1" else "off"

    def boot(self) -> str:
        """The boot device as ipmi_sim named it: none, pxe, default (= disk!), cdrom, bios."""
        return self._read("boot", "none")

    def boot_device(self) -> str:
        """:meth:`boot` in the driver's vocabulary (pxe, disk, cdrom, bios-setup, default)."""
        return BOOT_NAMES.get(self.boot(), self.boot())

    def identify(self) -> str:
        """``off``, ``on`` (forced, indefinitely) or ``<N>s`` (timed), from the last call."""
        parts = self._read("identify", "0 0").split()
        interval, force = (int(parts[0]), int(parts[1])) if len(parts) == 2 else (0, 0)
        if force:
            return "on"
        return f"{interval}s" if interval else "off"

    def resets(self) -> int:
        return len(self._read("resets").split())

    def call_log(self) -> list[tuple[float, str]]:
        """Every chassis control call: (unix time, ``"set power 1"``), oldest first."""
        out = []
        for line in self._read("calls.log").splitlines():
            ts, _, rest = line.partition(" ")
            out.append((float(ts), rest))
        return out

    def calls(self, sets_only: bool = False) -> list[str]:
        """The calls without timestamps, e.g. ``["get power", "set power 1"]``."""
        return [c for _, c in self.call_log() if not sets_only or c.startswith("set ")]

    def clear_calls(self) -> None:
        (self.dir / "calls.log").write_text("")

    # -- changing the machine behind the BMC's back
    def set_power(self, on: bool) -> None:
        """Someone pressed the power button: the BMC will report this state."""
        (self.dir / "power").write_text("1\n" if on else "0\n")
        (self.dir / "off_at").unlink(missing_ok=True)

    def set_boot(self, name: str) -> None:
        (self.dir / "boot").write_text(name + "\n")

    def soft_off(self, behaviour: str | float) -> None:
        """What the "OS" does on a soft shutdown (chassis control 5): ``"obey"`` powers off
        at once (the default), ``"ignore"`` stays on, a number powers off that many seconds
        later (seen by the next power read)."""
        if isinstance(behaviour, str):
            if behaviour not in ("obey", "ignore"):
                raise ValueError(behaviour)
            value = behaviour
        else:
            value = str(int(behaviour * 1000))
        (self.dir / "soft").write_text(value + "\n")

    def fail(self, param: str | None, op: str | None = None) -> None:
        """Make the program fail (exit 1, so ipmi_sim answers 0xff) for ``param`` (power,
        boot, reset, shutdown, identify), only for ``op`` (get/set) if given; None: stop."""
        path = self.dir / "fail"
        if param is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(f"{op} {param}\n" if op else f"{param}\n")

    # -- clients
    def access(self, password: str | None = None, username: str = USER,
               port: int | None = None) -> BmcAccess:
        """How the appliance reaches this BMC (driver ``ipmi``); ``port``: e.g. a proxy's."""
        return BmcAccess(driver="ipmi", address=self.host, port=port or self.port,
                         username=username,
                         password=self.password if password is None else password)

    def ipmitool_cmd(self, *args: str, cipher: int = 3, port: int | None = None,
                     username: str = USER, timeout_opts: Sequence[str] = ()) -> list[str]:
        """The ipmitool command line (the password goes in IPMI_PASSWORD, ``-E``)."""
        return ["ipmitool", "-I", "lanplus", "-C", str(cipher), *timeout_opts,
                "-H", self.host, "-p", str(port or self.port), "-U", username, "-E", *args]

    def run_ipmitool(self, *args: str, password: str | None = None, cipher: int = 3,
                     port: int | None = None, username: str = USER,
                     timeout_opts: Sequence[str] = (), timeout: float = 60
                     ) -> subprocess.CompletedProcess:
        """Run ipmitool against this BMC (inside its namespace, if any); never raises on
        ipmitool's exit status."""
        cmd = self.ipmitool_cmd(*args, cipher=cipher, port=port, username=username,
                                timeout_opts=timeout_opts)
        env = dict(os.environ, IPMI_PASSWORD=self.password if password is None else password)
        if self.ns is not None:
            return self.ns.exec(cmd, check=False, timeout=timeout, env=env)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)

    def ipmitool(self, *args: str, **kw) -> str:  # type: ignore[no-untyped-def]
        """``ipmitool -I lanplus -C 3 -H 127.0.0.1 -p PORT -U admin -E ARGS``: its stdout;
        :class:`IpmitoolError` if it fails. Keywords as :meth:`run_ipmitool`."""
        result = self.run_ipmitool(*args, **kw)
        if result.returncode != 0:
            raise IpmitoolError(args, result)
        return result.stdout

    def ping(self, timeout: float = 1.0) -> bool:
        """One RMCP presence ping: True if the pong came back within ``timeout``."""
        return bool(_ping_all([self], timeout))


# --- fleets -----------------------------------------------------------------------------------

def _ping_all(bmcs: Sequence[SimBmc], timeout: float) -> set[int]:
    """Ping every BMC (one socket, resent every 0.2 s); the indexes that answered."""
    if not bmcs:
        return set()
    ns = bmcs[0].ns

    def run() -> set[int]:
        by_port = {b.port: b.index for b in bmcs}
        answered: set[int] = set()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((HOST, 0))
            deadline = time.monotonic() + timeout
            next_send = 0.0
            while len(answered) < len(by_port):
                now = time.monotonic()
                if now >= deadline:
                    break
                if now >= next_send:
                    for port, index in by_port.items():
                        if index not in answered:
                            try:
                                s.sendto(RMCP_PING, (HOST, port))
                            except OSError:
                                pass
                    next_send = now + 0.2
                s.settimeout(max(0.01, min(next_send, deadline) - time.monotonic()))
                try:
                    data, (_, port) = s.recvfrom(512)
                except (TimeoutError, ConnectionRefusedError):
                    continue
                if len(data) >= 9 and data[8] == 0x40 and port in by_port:
                    answered.add(by_port[port])
        finally:
            s.close()
        return answered

    return in_netns(ns, run)


def _wait_ready(bmcs: Sequence[SimBmc], timeout: float) -> list[SimBmc]:
    """Wait until every BMC answers a ping. Returns those whose process died early (e.g.
    port trouble) for the caller to retry; raises :class:`SimError` on a timeout."""
    pending = {b.index: b for b in bmcs}
    dead: list[SimBmc] = []
    deadline = time.monotonic() + timeout
    while pending:
        for b in list(pending.values()):
            if not b.alive():
                dead.append(b)
                del pending[b.index]
        if not pending:
            break
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            b = next(iter(pending.values()))
            raise SimError(
                f"{len(pending)} of {len(bmcs)} ipmi_sim BMCs did not answer an RMCP ping "
                f"within {timeout}s, e.g. BMC {b.index} (pid {b.proc.pid if b.proc else '-'}, "
                f"port {b.port}); its log:\n{b.log()[-3000:]}")
        for index in _ping_all(list(pending.values()), min(1.0, remaining)):
            del pending[index]
    return dead


def start_fleet(workdir: Path | str, count: int, base_port: int | None = None,
                password: str = DEFAULT_PASSWORD, ns: Namespace | None = None,
                timeout: float = 30.0, initial_power: str = "off",
                verify: bool = True) -> list[SimBmc]:
    """Start ``count`` ipmi_sim BMCs in parallel; return them once each answers.

    ``workdir/bmc-NNN`` is (re)created for each. Ports: ``base_port`` + i, or free ones
    (see :func:`pick_ports`). ``ns``: run them on 127.0.0.1 of that namespace (ipmitool
    calls then run there too). ``verify``: also log in once (``ipmitool mc info`` on the
    first BMC, no chassis call). On any failure every BMC already started is stopped.
    """
    if shutil.which("ipmi_sim") is None:
        raise SimError("ipmi_sim not found (Debian package openipmi)")
    if initial_power not in ("on", "off"):
        raise ValueError(initial_power)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    ports = pick_ports(count, base_port, ns=ns)
    bmcs: list[SimBmc] = []
    try:
        for i, port in enumerate(ports):
            d = workdir / f"bmc-{i:03d}"
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            b = SimBmc(index=i, port=port, password=password, dir=d, ns=ns)
            b._write_config()
            b.set_power(initial_power == "on")
            b.set_boot("none")
            b.soft_off("obey")
            (d / "identify").write_text("0 0\n")
            (d / "calls.log").write_text("")
            bmcs.append(b)
        for b in bmcs:
            if base_port is None and not in_netns(ns, lambda b=b: _port_free(b.port)):
                b.port = pick_ports(1, avoid=[x.port for x in bmcs], ns=ns)[0]
                b._write_config()
            b._launch()
        for attempt in range(3):
            dead = _wait_ready(bmcs, timeout)
            if not dead:
                break
            if attempt == 2 or base_port is not None:
                raise SimError(f"ipmi_sim BMC {dead[0].index} (port {dead[0].port}) exited "
                               f"with {dead[0].proc.returncode if dead[0].proc else '?'}; "
                               f"its log:\n{dead[0].log()[-3000:]}")
            for b in dead:                          # lost a port race: new port, again
                b.proc = None
                b.port = pick_ports(1, avoid=[x.port for x in bmcs], ns=ns)[0]
                b._write_config()
                b._launch()
        if verify and bmcs:
            r = bmcs[0].run_ipmitool("mc", "info", timeout=30)
            if r.returncode != 0:
                raise SimError(f"ipmitool cannot log in to BMC 0 (port {bmcs[0].port}): "
                               f"{r.stderr.strip()}; ipmi_sim log:\n{bmcs[0].log()[-3000:]}")
        return bmcs
    except BaseException:
        stop_fleet(bmcs)
        raise


def stop_fleet(bmcs: Sequence[SimBmc], timeout: float = 5.0) -> None:
    """SIGTERM every BMC's process (by PID) at once, wait, SIGKILL stragglers."""
    for b in bmcs:
        b._signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for b in bmcs:
        if b.proc is None:
            continue
        try:
            b.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        b.stop(timeout=1.0)


def enroll(app: ApplianceProcess, name: str, mac: str, port: int, password: str,
           timeout: float = 120) -> None:
    """Register machine ``name`` (``mac``) with the appliance and give it the IPMI BMC at
    127.0.0.1:``port`` (user ``admin``, ``password``): through the CLI, as an operator
    would. ``port`` may be a simulator's or a :class:`tests.bmcfault.FaultProxy`'s."""
    app.cli("machine", "add", mac, "--hostname", name, timeout=timeout)
    app.cli("machine", "bmc", name, "--address", HOST, "--port", str(port), "--username",
            USER, "--password-stdin", input=password + "\n", timeout=timeout)


@contextmanager
def running_fleet(workdir: Path | str, count: int, **kw) -> Iterator[list[SimBmc]]:  # type: ignore[no-untyped-def]
    """``with running_fleet(tmp, 3, password=...) as bmcs:``; always stops them all."""
    bmcs: list[SimBmc] = []
    try:
        bmcs = start_fleet(workdir, count, **kw)
        yield bmcs
    finally:
        stop_fleet(bmcs)
