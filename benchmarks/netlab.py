#!/usr/bin/env python3
"""A bandwidth-limited link lab built from Linux network namespaces.

Each *site* (one training worker, or one node of a multi-node job) gets its own network namespace. The sites
are joined by veth pairs to a Linux bridge that lives in a namespace of its own, so the topology is the same
star for two sites and for more::

    site 0 ns ({prefix}-s0)            bridge ns ({prefix}-br)            site 1 ns ({prefix}-s1)
    lab0 fd00:e1::1/64 ==veth== p0 --+-- br0 --+-- p1 ==veth== lab0 fd00:e1::2/64
    [tbf: site 0 upload]   [tbf: site 0 download]  [tbf: site 1 download]   [tbf: site 1 upload]

Shapers (``tc qdisc ... tbf``) act on egress only, so every site's access link is shaped twice:

* on ``lab0`` inside the site's namespace: everything the site *sends* (its upload);
* on ``p<i>`` inside the bridge namespace: everything the bridge delivers *to* the site (its download).

A single flow from site A to site B passes A's upload shaper and then B's download shaper, both at the site
rate R, so it sees R (measured here: about 0.94·R of TCP payload, the rest being Ethernet, IPv6 and TCP
headers; ``tc``'s ``mbit`` is 10^6 bit/s). Flows that share a site share its R in each direction: a site
sending to two others gets R in total, and two sites sending to one get R in total at the receiver. That is
the usual model of sites on access links of R up and R down, each full duplex; the bridge itself is not a
bottleneck. A ring all-reduce, where every site sends to one neighbour and receives from another, therefore
runs each ring hop at R.

Addresses are IPv6 ULA (``fd00:e1::<site+1>/64`` by default), added with ``nodad`` so they are usable at once;
the site interfaces get no link-local address (``addrgenmode none``), so the ULA address is the only one on
``lab0`` and gloo, which takes the first address of ``GLOO_SOCKET_IFNAME``, always picks it. Loopback is up in
every site. Nothing is created in the caller's namespace: the veth pairs are made inside the bridge namespace
and their site ends moved straight into the sites, so concurrent labs never clash on interface names and
deleting the namespaces removes everything.

Use as a library::

    from netlab import Lab, netns_available, torchrun_argv

    ok, why = netns_available()
    with Lab(num_sites=2, rate_mbit=50) as lab:
        lab.run(1, ["python3", "-c", "print('hello from site 1')"])
        procs = [lab.popen(s, torchrun_argv(lab, s, ["probe.py"], port=29400)) for s in lab.site_ids]
        ...
        lab.set_rate(200)

or from the shell (``python benchmarks/netlab.py --help``): ``check``, ``up``, ``list``, ``cleanup --prefix P``
and ``probe`` (the all-reduce probe across the sites through torchrun).

Requires root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), ``ip`` and ``tc`` from iproute2, and the ``veth``,
``bridge`` and ``sch_tbf`` kernel features. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

__all__ = [
    "IfaceCounters",
    "Lab",
    "LabError",
    "Site",
    "cleanup",
    "list_labs",
    "netns_available",
    "parse_proc_net_dev",
    "run_probe",
    "torchrun_argv",
]

#: Name of the interface inside every site namespace.
SITE_IFACE = "lab0"
#: Name of the bridge inside the bridge namespace.
BRIDGE = "br0"
#: Default IPv6 ULA /64 prefix of the lab; site i gets ``<subnet><i+1>``.
DEFAULT_SUBNET = "fd00:e1::"
#: Default rendezvous port for torchrun (free in a fresh namespace).
DEFAULT_PORT = 29400
#: Default queue of each shaper (tbf ``latency``), in ms at the rate: 25 KB at 4 Mbit/s.
DEFAULT_QUEUE_MS = 50.0
#: The collectives ``allreduce_probe.py`` times.
PROBE_OPS = ("all_reduce", "all_gather", "exchange")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,39}$")
_LAB_NS_RE = re.compile(r"^(?P<prefix>.+)-(?P<role>br|s\d+)$")
_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class LabError(RuntimeError):
    """A lab could not be built, changed or torn down."""


@dataclass(frozen=True)
class Site:
    """One site of a lab: its namespace, interface and address."""

    index: int
    netns: str
    iface: str
    addr: str
    prefix_len: int = 64

    @property
    def bracketed(self) -> str:
        """The address in URL form, ``[fd00:e1::1]``."""
        return f"[{self.addr}]"


@dataclass(frozen=True)
class IfaceCounters:
    """Byte and packet counters of one interface, from ``/proc/net/dev`` inside its namespace."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int

    def __sub__(self, other: IfaceCounters) -> IfaceCounters:
        return IfaceCounters(
            self.rx_bytes - other.rx_bytes,
            self.rx_packets - other.rx_packets,
            self.tx_bytes - other.tx_bytes,
            self.tx_packets - other.tx_packets,
        )


# --------------------------------------------------------------------------------------------------------------
# Small helpers around ip / tc


def _sh(argv: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run an ``ip``/``tc`` command, capturing output; raise LabError with its stderr on failure."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError as exc:
        raise LabError(f"{argv[0]} not found: install iproute2") from exc
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and proc.returncode != 0:
        msg = (proc.stderr or proc.stdout).strip()
        raise LabError(f"`{' '.join(argv)}` failed (exit {proc.returncode}): {msg}")
    return proc


def _list_netns() -> list[str]:
    """Names of all named network namespaces (``ip netns list``)."""
    out = _sh(["ip", "-j", "netns", "list"], check=False)
    if out.returncode != 0 or not out.stdout.strip():
        return []
    try:
        return [entry["name"] for entry in json.loads(out.stdout)]
    except (ValueError, KeyError, TypeError):
        return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    out = _sh(["ip", "netns", "pids", netns], check=False)
    return [int(tok) for tok in out.stdout.split() if tok.isdigit()]


def _kill_netns_processes(netns: str, grace_s: float = 3.0) -> None:
    """SIGTERM every process living in ``netns``, then SIGKILL whatever is left after ``grace_s``."""
    pids = _netns_pids(netns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        time.sleep(0.05)
        pids = _netns_pids(netns)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _delete_netns(netns: str) -> str | None:
    """Kill the processes in ``netns`` and delete it. Returns an error message, or None on success."""
    _kill_netns_processes(netns)
    proc = _sh(["ip", "netns", "del", netns], check=False)
    if proc.returncode != 0 and netns in _list_netns():
        return f"{netns}: {(proc.stderr or proc.stdout).strip()}"
    return None


def _signal_proc(proc: subprocess.Popen[Any], sig: int) -> None:
    """Send ``sig`` to ``proc``'s process group if it leads one (``start_new_session``), else to it alone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)


def _tbf_args(rate_mbit: float, burst_bytes: int | None, queue_ms: float) -> list[str]:
    """``tc`` arguments for a token bucket of ``rate_mbit`` (10^6 bit/s)."""
    rate_bit = round(rate_mbit * 1e6)
    if rate_bit <= 0:
        raise ValueError(f"rate must be positive, got {rate_mbit} Mbit/s")
    # Two milliseconds of tokens, at least 16 KiB: small enough not to matter for multi-MB transfers, large
    # enough that the timer granularity does not cap the rate (a fixed 16 KiB bucket held 1 Gbit/s to 720).
    burst = burst_bytes if burst_bytes is not None else max(16 * 1024, rate_bit // 8 // 500)
    return ["tbf", "rate", f"{rate_bit}bit", "burst", str(int(burst)), "latency", f"{queue_ms:g}ms"]


def _validate_prefix(prefix: str) -> str:
    if not _NAME_RE.match(prefix):
        raise ValueError(f"bad lab prefix {prefix!r}: use 1-40 characters of [A-Za-z0-9_.-], starting alnum")
    return prefix


# --------------------------------------------------------------------------------------------------------------
# Availability


@functools.lru_cache(maxsize=1)
def netns_available() -> tuple[bool, str]:
    """Whether this process can build a lab here; if not, a one-line reason fit for ``pytest.skip``.

    Checks for root, for ``ip`` and ``tc``, then really makes a throwaway namespace holding a bridge, a veth
    pair and a tbf qdisc, and removes it again. The answer is cached for the life of the process.
    """
    if sys.platform != "linux":
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, f"the link lab needs root for `ip netns add` (euid is {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None and shutil.which(tool, path="/usr/sbin:/sbin") is None:
            return False, f"`{tool}` (iproute2) is not installed"
    name = f"netlab-probe-{os.getpid()}-{secrets.token_hex(2)}"
    try:
        _sh(["ip", "netns", "add", name])
    except LabError as exc:
        return False, f"`ip netns add` failed, network namespaces are unavailable here: {exc}"
    try:
        _sh(["ip", "-n", name, "link", "add", "nlbr", "type", "bridge"])
        _sh(["ip", "-n", name, "link", "add", "nla", "type", "veth", "peer", "name", "nlb"])
        _sh(["tc", "-n", name, "qdisc", "add", "dev", "nla", "root", *_tbf_args(10, None, 50)])
    except LabError as exc:
        return False, f"namespaces work but a bridge, veth pair or tbf qdisc could not be made: {exc}"
    finally:
        _sh(["ip", "netns", "del", name], check=False)
    return True, ""


# --------------------------------------------------------------------------------------------------------------
# The lab


class Lab:
    """N sites in network namespaces, joined through a bridge by rate-limited veth links.

    Args:
        num_sites: number of site namespaces (at least 2).
        rate_mbit: per-site link rate in Mbit/s (10^6 bit/s), applied to each site's upload and download
            (see the module docstring); a sequence gives one rate per site; None leaves the links unshaped.
        prefix: unique run prefix; namespaces are ``<prefix>-br`` and ``<prefix>-s<i>``. Default
            ``netlab-<pid>-<4 hex>``.
        subnet: the IPv6 /64 prefix, ending in ``::``; site i gets ``<subnet><i+1>``.
        burst_bytes: tbf bucket size; default max(16 KiB, 2 ms at the rate).
        queue_ms: tbf ``latency``, i.e. the queue depth in time at the rate (packets beyond it are dropped).
        mtu: MTU of every lab interface.
        handle_signals: install SIGINT/SIGTERM/SIGHUP handlers while the lab is up (main thread only) that
            tear it down, then raise KeyboardInterrupt (SIGINT) or SystemExit(128 + signum).

    The lab is built by ``start()`` (or entering the ``with`` block) and removed by ``close()`` (or leaving
    it, also on an exception, a signal, or interpreter exit through ``atexit``). ``close()`` first ends the
    processes started through ``popen``/``run`` and any other process still inside the lab's namespaces.
    """

    def __init__(
        self,
        num_sites: int,
        rate_mbit: float | Sequence[float | None] | None,
        *,
        prefix: str | None = None,
        subnet: str = DEFAULT_SUBNET,
        burst_bytes: int | None = None,
        queue_ms: float = DEFAULT_QUEUE_MS,
        mtu: int = 1500,
        handle_signals: bool = True,
    ) -> None:
        if num_sites < 2:
            raise ValueError(f"a lab needs at least 2 sites, got {num_sites}")
        if not subnet.endswith("::"):
            raise ValueError(f"subnet must be a /64 prefix ending in '::', got {subnet!r}")
        self.num_sites = num_sites
        self.prefix = _validate_prefix(prefix or f"netlab-{os.getpid()}-{secrets.token_hex(2)}")
        self.bridge_netns = f"{self.prefix}-br"
        self.sites: list[Site] = [
            Site(index=i, netns=f"{self.prefix}-s{i}", iface=SITE_IFACE, addr=f"{subnet}{i + 1:x}")
            for i in range(num_sites)
        ]
        self.burst_bytes = burst_bytes
        self.queue_ms = queue_ms
        self.mtu = mtu
        self.handle_signals = handle_signals
        self._initial_rate = rate_mbit
        self._rates: list[float | None] = [None] * num_sites
        self._procs: list[subprocess.Popen[Any]] = []
        self._lock = threading.RLock()
        self._started = False
        self._closed = False
        self._prev_handlers: dict[int, Any] = {}
        self._pending_signal: int | None = None
        self._created: list[str] = []

    # ---- properties ------------------------------------------------------------------------------------------

    @property
    def site_ids(self) -> range:
        """``range(num_sites)``."""
        return range(self.num_sites)

    @property
    def namespaces(self) -> list[str]:
        """All namespace names of this lab, bridge first."""
        return [self.bridge_netns, *(s.netns for s in self.sites)]

    @property
    def rates(self) -> list[float | None]:
        """The current per-site rate in Mbit/s (None: unshaped)."""
        return list(self._rates)

    def site(self, site: int | Site) -> Site:
        """The Site for an index (or the Site itself)."""
        return site if isinstance(site, Site) else self.sites[site]

    def addr(self, site: int | Site) -> str:
        """The site's IPv6 address (no brackets)."""
        return self.site(site).addr

    # ---- build / teardown --------------------------------------------------------------------------------------

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> Lab:
        """Build the namespaces, links, addresses and shapers. On any failure, removes what it made."""
        with self._lock:
            if self._started:
                raise LabError("lab already started")
            self._started = True
        self._install_signal_handlers()
        atexit.register(self.close)
        try:
            self._build()
            self.set_rate(self._initial_rate)
        except BaseException:
            self.close()
            raise
        return self

    def _build(self) -> None:
        clash = set(self.namespaces) & set(_list_netns())
        if clash:
            raise LabError(f"namespaces already exist: {sorted(clash)}; run `netlab.py cleanup --prefix P`")
        br = self.bridge_netns
        self._add_netns(br)
        # The bridge namespace only switches frames: no IPv6 on its own interfaces.
        _sh(["ip", "netns", "exec", br, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"], check=False)
        _sh(["ip", "netns", "exec", br, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"], check=False)
        _sh(["ip", "-n", br, "link", "add", BRIDGE, "type", "bridge", "forward_delay", "0", "stp_state", "0"])
        _sh(["ip", "-n", br, "link", "set", BRIDGE, "type", "bridge", "mcast_snooping", "0"], check=False)
        _sh(["ip", "-n", br, "link", "set", BRIDGE, "up"])
        for s in self.sites:
            port = f"p{s.index}"
            self._add_netns(s.netns)
            _sh(["ip", "-n", s.netns, "link", "set", "lo", "up"])
            veth = ["ip", "-n", br, "link", "add", port, "mtu", str(self.mtu), "type", "veth"]
            _sh([*veth, "peer", "name", s.iface, "mtu", str(self.mtu), "netns", s.netns])
            _sh(["ip", "-n", br, "link", "set", port, "master", BRIDGE])
            _sh(["ip", "-n", br, "link", "set", port, "up"])
            _sh(["ip", "-n", s.netns, "link", "set", s.iface, "addrgenmode", "none"])
            _sh(["ip", "-n", s.netns, "-6", "addr", "add", f"{s.addr}/{s.prefix_len}", "dev", s.iface, "nodad"])
            _sh(["ip", "-n", s.netns, "link", "set", s.iface, "up"])

    def _add_netns(self, name: str) -> None:
        _sh(["ip", "netns", "add", name])
        self._created.append(name)  # close() deletes only what this lab made

    def set_rate(self, rate_mbit: float | Sequence[float | None] | None, sites: Sequence[int] | None = None) -> None:
        """Set the link rate of ``sites`` (default all) without rebuilding: both shapers of each site.

        ``rate_mbit`` is Mbit/s (10^6 bit/s), a per-site sequence aligned with ``sites``, or None to remove
        the shapers. Takes effect at once for traffic in flight (``tc qdisc replace``).
        """
        targets = list(self.site_ids if sites is None else sites)
        if isinstance(rate_mbit, Sequence) and not isinstance(rate_mbit, str):
            rates = list(rate_mbit)
            if len(rates) != len(targets):
                raise ValueError(f"{len(rates)} rates for {len(targets)} sites")
        else:
            rates = [rate_mbit] * len(targets)
        for i, rate in zip(targets, rates, strict=True):
            s = self.sites[i]
            for netns, dev in ((s.netns, s.iface), (self.bridge_netns, f"p{i}")):
                if rate is None:
                    _sh(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], check=False)
                else:
                    tbf = _tbf_args(float(rate), self.burst_bytes, self.queue_ms)
                    _sh(["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", *tbf])
            self._rates[i] = None if rate is None else float(rate)

    def close(self) -> None:
        """Tear everything down; idempotent and safe to call from a signal handler or ``atexit``.

        Ends the processes this lab started (their whole session), then every process still inside the lab's
        namespaces, then deletes the namespaces (which removes the veths, bridge and qdiscs with them).
        Problems are reported on stderr, never raised, so they do not mask the exception that caused the exit.
        """
        with self._lock:
            if self._closed or not self._started:
                self._closed = True
                return
            self._closed = True
        try:
            self._stop_procs()
            errors = [err for ns in reversed(self._created) if (err := _delete_netns(ns))]
            if errors:
                print(
                    f"netlab: could not remove {errors}; retry with `netlab.py cleanup --prefix {self.prefix}`",
                    file=sys.stderr,
                )
        finally:
            self._restore_signal_handlers()
            with contextlib.suppress(Exception):
                atexit.unregister(self.close)
            pending, self._pending_signal = self._pending_signal, None
            if pending is not None:
                os.kill(os.getpid(), pending)

    def leftovers(self) -> list[str]:
        """Namespaces of this lab that still exist (empty after a clean ``close``)."""
        return [ns for ns in _list_netns() if ns in set(self.namespaces)]

    def _stop_procs(self, grace_s: float = 3.0) -> None:
        live = [p for p in self._procs if p.poll() is None]
        for p in live:
            _signal_proc(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in live:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_proc(p, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=1.0)
        self._procs.clear()

    # ---- signals ---------------------------------------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        if not self.handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNALS:
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN:
                continue  # e.g. SIGHUP under nohup: respect it
            self._prev_handlers[sig] = prev
            signal.signal(sig, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, prev in self._prev_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self._prev_handlers.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._closed:
            # A teardown is already running (a second Ctrl+C, or a signal during __exit__): let it finish,
            # then close() re-sends the signal to ourselves under the previous handler.
            self._pending_signal = signum
            return
        prev = self._prev_handlers.get(signum)
        print(f"netlab: {signal.Signals(signum).name}: tearing down lab {self.prefix}", file=sys.stderr)
        self.close()  # also restores the previous handlers
        if callable(prev) and prev is not signal.default_int_handler:
            prev(signum, frame)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + signum)

    # ---- running things in a site --------------------------------------------------------------------------

    def env(self, site: int | Site, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The environment for a process in ``site``: ``os.environ`` plus the lab variables, plus ``extra``.

        Lab variables: ``GLOO_SOCKET_IFNAME`` and ``TP_SOCKET_IFNAME`` (the site interface, so gloo and
        tensorpipe bind to it rather than falling back to 127.0.0.1), ``NETLAB_SITE``, ``NETLAB_NUM_SITES``,
        ``NETLAB_ADDR``, ``NETLAB_IFACE``, ``NETLAB_ADDRS`` (all sites' addresses, comma separated),
        ``NETLAB_PREFIX`` and ``NETLAB_RATE_MBIT`` (empty when unshaped).
        """
        s = self.site(site)
        env = dict(os.environ)
        rate = self._rates[s.index]
        env.update(
            GLOO_SOCKET_IFNAME=s.iface,
            TP_SOCKET_IFNAME=s.iface,
            NETLAB_SITE=str(s.index),
            NETLAB_NUM_SITES=str(self.num_sites),
            NETLAB_ADDR=s.addr,
            NETLAB_IFACE=s.iface,
            NETLAB_ADDRS=",".join(x.addr for x in self.sites),
            NETLAB_PREFIX=self.prefix,
            NETLAB_RATE_MBIT="" if rate is None else f"{rate:g}",
        )
        if extra:
            env.update(extra)
        return env

    def command(self, site: int | Site, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped in ``ip netns exec <site netns>``."""
        return ["ip", "netns", "exec", self.site(site).netns, *argv]

    def popen(
        self,
        site: int | Site,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` inside ``site`` (``ip netns exec``) with ``self.env(site, env)``; returns the Popen.

        The process starts a new session (``start_new_session=True`` unless given) so that ``close()`` can end
        it and its children as a group; it is tracked and ended by ``close()`` if still running.
        """
        if not self._started or self._closed:
            raise LabError("lab is not running")
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(self.command(site, argv), env=self.env(site, env), **kwargs)
        with self._lock:
            self._procs = [p for p in self._procs if p.poll() is None]
            self._procs.append(proc)
        return proc

    def run(
        self,
        site: int | Site,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = 60.0,
        check: bool = True,
        capture_output: bool = True,
        text: bool = True,
        input: str | bytes | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside ``site`` to completion, like ``subprocess.run``.

        On timeout the process group is killed and ``subprocess.TimeoutExpired`` raised; with ``check`` a
        non-zero exit raises ``subprocess.CalledProcessError``.
        """
        pipe = subprocess.PIPE if capture_output else None
        stdin = subprocess.PIPE if input is not None else subprocess.DEVNULL
        proc = self.popen(site, argv, env=env, stdout=pipe, stderr=pipe, stdin=stdin, text=text)
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_proc(proc, signal.SIGKILL)
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    # ---- measurements -------------------------------------------------------------------------------------------

    def counters(self, site: int | Site) -> IfaceCounters:
        """The site interface's counters from ``/proc/net/dev`` read inside the site namespace."""
        s = self.site(site)
        text = _sh(["ip", "netns", "exec", s.netns, "cat", "/proc/net/dev"]).stdout
        return parse_proc_net_dev(text)[s.iface]

    def shaper_stats(self, site: int | Site) -> dict[str, dict[str, int]]:
        """``tc -s`` statistics (bytes, packets, drops, overlimits) of the site's upload and download shapers."""
        s = self.site(site)
        out: dict[str, dict[str, int]] = {}
        for name, netns, dev in (("upload", s.netns, s.iface), ("download", self.bridge_netns, f"p{s.index}")):
            proc = _sh(["tc", "-j", "-s", "-n", netns, "qdisc", "show", "dev", dev], check=False)
            with contextlib.suppress(ValueError):
                for q in json.loads(proc.stdout or "[]"):
                    if q.get("kind") == "tbf":
                        out[name] = {k: int(q.get(k, 0)) for k in ("bytes", "packets", "drops", "overlimits")}
        return out


def parse_proc_net_dev(text: str) -> dict[str, IfaceCounters]:
    """Parse ``/proc/net/dev`` into ``{iface: IfaceCounters}``."""
    out: dict[str, IfaceCounters] = {}
    for line in text.splitlines()[2:]:
        if ":" not in line:
            continue
        name, rest = line.split(":", 1)
        f = [int(x) for x in rest.split()]
        out[name.strip()] = IfaceCounters(rx_bytes=f[0], rx_packets=f[1], tx_bytes=f[8], tx_packets=f[9])
    return out


# --------------------------------------------------------------------------------------------------------------
# Leftovers


def list_labs(prefix: str = "") -> dict[str, list[str]]:
    """Existing lab namespaces whose lab prefix starts with ``prefix``, grouped as ``{lab prefix: [names]}``."""
    labs: dict[str, list[str]] = {}
    for name in _list_netns():
        m = _LAB_NS_RE.match(name)
        if m and m.group("prefix").startswith(prefix):
            labs.setdefault(m.group("prefix"), []).append(name)
    return labs


def cleanup(prefix: str) -> list[str]:
    """Remove every lab namespace (``<lab>-br``, ``<lab>-s<i>``) whose lab prefix starts with ``prefix``.

    Processes still running inside those namespaces are ended first (SIGTERM, then SIGKILL after 3 s).
    Returns the names removed; raises LabError if some could not be removed.
    """
    if not prefix:
        raise ValueError("cleanup needs a non-empty prefix")
    names = sorted(n for ns in list_labs(prefix).values() for n in ns)
    errors = [err for n in names if (err := _delete_netns(n))]
    if errors:
        raise LabError(f"could not remove: {errors}")
    return names


# --------------------------------------------------------------------------------------------------------------
# torchrun across the sites


def torchrun_argv(
    lab: Lab,
    site: int | Site,
    script_args: Sequence[str],
    port: int = DEFAULT_PORT,
    *,
    nproc_per_node: int = 1,
    rdzv_id: str | None = None,
    python: str = sys.executable,
    extra: Sequence[str] = (),
) -> list[str]:
    """The torchrun command line that starts ``site``'s node of a job spanning all the lab's sites.

    Site 0 hosts the c10d rendezvous store on ``[addr0]:port``: it gets ``--rdzv-conf is_host=1`` and all
    others ``is_host=0`` (the c10d backend's hostname heuristic cannot tell inside a namespace). Every node
    advertises its own lab address with ``--local-addr``. ``--node-rank`` is passed for clarity, but the c10d
    rendezvous assigns node ranks in arrival order, so a node's group rank need not equal its site index
    (``NETLAB_SITE`` in the environment says which site a process is on). Run it with ``lab.popen(site, ...)``
    so that ``GLOO_SOCKET_IFNAME`` is set. ``script_args`` is the training script and its arguments, as
    torchrun takes them (or ``["-m", "module", ...]``, which is passed as ``--module module ...``).
    """
    s = lab.site(site)
    host = lab.sites[0]
    head = [python, "-m", "torch.distributed.run"]
    args = [
        "--nnodes", str(lab.num_sites),
        "--nproc-per-node", str(nproc_per_node),
        "--node-rank", str(s.index),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"{host.bracketed}:{port}",
        "--rdzv-id", rdzv_id or lab.prefix,
        "--rdzv-conf", f"is_host={1 if s.index == 0 else 0}",
        "--local-addr", s.addr,
        "--max-restarts", "0",
        *extra,
    ]  # fmt: skip
    script = list(script_args)
    if script[:1] == ["-m"]:
        script = ["--module", *script[1:]]
    return [*head, *args, *script]


def run_probe(
    lab: Lab,
    *,
    size_mb: float,
    iters: int,
    port: int = DEFAULT_PORT,
    timeout: float = 300.0,
    threads: int = 1,
    op: str = "all_reduce",
    idle_s: float = 0.0,
) -> list[dict[str, Any]]:
    """Run ``allreduce_probe.py`` on every site through torchrun (``op``: ``all_reduce`` of float32, or
    ``all_gather`` / ``exchange`` of uint8, each after ``idle_s`` seconds of idle link); return each rank's JSON
    report.

    Each report also gets ``ns_tx_bytes``/``ns_rx_bytes``: the site interface's counters over the whole
    torchrun run (rendezvous and warm-up included), read from outside.
    """
    script = str(Path(__file__).with_name("allreduce_probe.py"))
    before = [lab.counters(s) for s in lab.site_ids]
    args = [script, "--size-mb", f"{size_mb:g}", "--iters", str(iters), "--threads", str(threads), "--op", op]
    args += ["--idle-s", f"{idle_s:g}"]
    procs = [
        lab.popen(s, torchrun_argv(lab, s, args, port), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for s in lab.site_ids
    ]
    outputs: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            _signal_proc(p, signal.SIGKILL)
        raise LabError(f"probe timed out after {timeout}s") from None
    failed = [(i, p.returncode, out) for i, (p, out) in enumerate(zip(procs, outputs, strict=True)) if p.returncode]
    if failed:
        i, rc, out = failed[0]
        raise LabError(f"torchrun on site {i} exited {rc}:\n{out[-4000:]}")
    deltas = [lab.counters(s) - b for s, b in zip(lab.site_ids, before, strict=True)]
    reports: list[dict[str, Any]] = []
    for out in outputs:
        for line in out.splitlines():
            if line.startswith("PROBE "):
                rep = json.loads(line[len("PROBE ") :])
                d = deltas[int(rep["site"])]
                rep.update(ns_tx_bytes=d.tx_bytes, ns_rx_bytes=d.rx_bytes)
                reports.append(rep)
    return sorted(reports, key=lambda r: r["rank"])


def collective_seconds(reports: Sequence[Mapping[str, Any]]) -> list[float]:
    """Per timed iteration, the slowest rank's seconds: when the collective was done everywhere (every rank starts
    it after the same barrier). A per-rank median hides a collective that one rank always finishes late."""
    return [max(times) for times in zip(*(r["sec_all"] for r in reports), strict=True)]


# --------------------------------------------------------------------------------------------------------------
# CLI


def _idle_seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text}: the idle time must be >= 0 s")
    return value


def _parse_rates(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _cmd_check(_: argparse.Namespace) -> int:
    ok, why = netns_available()
    print("ok: network namespaces, veth, bridge and tbf are available" if ok else f"unavailable: {why}")
    return 0 if ok else 1


def _cmd_list(args: argparse.Namespace) -> int:
    for lab, names in sorted(list_labs(args.prefix).items()):
        print(f"{lab}: {' '.join(sorted(names))}")
    return 0


def _cmd_cleanup(args: argparse.Namespace) -> int:
    removed = cleanup(args.prefix)
    print(f"removed {len(removed)} namespace(s)" + (f": {' '.join(removed)}" if removed else ""))
    return 0


def _cmd_up(args: argparse.Namespace) -> int:
    with Lab(args.sites, args.rate, prefix=args.prefix) as lab:
        rate = "unshaped links" if args.rate is None else f"{args.rate:g} Mbit/s per site link, up and down"
        print(f"lab {lab.prefix} is up: {lab.num_sites} sites, {rate}")
        for s in lab.sites:
            print(f"  site {s.index}: ip netns exec {s.netns} ...   ({s.iface} {s.addr}/{s.prefix_len})")
        print(f"  GLOO_SOCKET_IFNAME={SITE_IFACE}; Ctrl+C (or SIGTERM) tears it down", flush=True)
        deadline = time.monotonic() + args.hold if args.hold else None
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    return 0


def _cmd_probe(args: argparse.Namespace) -> int:
    ok, why = netns_available()
    if not ok:
        print(f"skipped: {why}", file=sys.stderr)
        return 2
    rates: list[float | None] = [*_parse_rates(args.rates)] if args.rates else [None]
    with Lab(args.sites, rates[0], prefix=args.prefix) as lab:
        what = "all-reduce of {:g} MB float32" if args.op == "all_reduce" else "all-gather of {:g} MB per rank"
        what += " (receive-first exchange)" if args.op == "exchange" else ""
        idle = f", {args.idle_s:g} s idle before each" if args.idle_s else ""
        print(f"lab {lab.prefix}: {args.sites} sites; {what.format(args.size_mb)} x {args.iters}{idle}")
        hdr = f"{'rate':>8} {'rank':>4} {'site':>4} {'s/' + args.op:>12} {'expect s':>9} {'algbw Mb/s':>10}"
        hdr += f" {'wire Mb/s':>9} {'tx/iter MB':>10} {'tx/S':>6} {'ns tx MB':>9} {'ns rx MB':>9}"
        print(hdr)
        for k, rate in enumerate(rates):
            lab.set_rate(rate)
            reps = run_probe(
                lab, size_mb=args.size_mb, iters=args.iters, port=args.port + k, threads=args.threads, op=args.op,
                idle_s=args.idle_s,
            )  # fmt: skip
            n = lab.num_sites
            # Ring all-reduce: every rank sends 2(n-1)/n of the tensor over its upload; ring all-gather (n-1) times.
            share = 2 * (n - 1) / n if args.op == "all_reduce" else n - 1
            for r in reps:
                expect = share * r["bytes"] * 8 / (rate * 1e6) if rate else float("nan")
                print(
                    f"{rate or 0:>8g} {r['rank']:>4} {r['site']:>4} {r['sec_median']:>12.4f} {expect:>9.4f}"
                    f" {r['algbw_mbit']:>10.1f} {r['wire_tx_mbit']:>9.1f} {r['tx_bytes_per_iter'] / 1e6:>10.3f}"
                    f" {r['tx_bytes_per_iter'] / r['bytes']:>6.3f} {r['ns_tx_bytes'] / 1e6:>9.2f}"
                    f" {r['ns_rx_bytes'] / 1e6:>9.2f}"
                )
            slowest = collective_seconds(reps)
            print(f"{rate or 0:>8g} {'all':>4} {'-':>4} {statistics.median(slowest):>12.4f}  (slowest rank per "
                  f"{args.op}, median of {len(slowest)}: done everywhere)")  # fmt: skip
            if args.json:
                print("JSON " + json.dumps({"rate_mbit": rate, "sites": n, "reports": reps}))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="netlab.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="say whether a lab can be built here (exit 1 if not)").set_defaults(fn=_cmd_check)
    p = sub.add_parser("list", help="list existing lab namespaces")
    p.add_argument("--prefix", default="", help="only labs whose prefix starts with this")
    p.set_defaults(fn=_cmd_list)
    p = sub.add_parser("cleanup", help="remove the namespaces (and processes) of labs whose prefix starts with P")
    p.add_argument("--prefix", required=True)
    p.set_defaults(fn=_cmd_cleanup)
    p = sub.add_parser("up", help="build a lab and hold it until Ctrl+C / SIGTERM (or --hold seconds)")
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--rate", type=float, default=None, help="Mbit/s per site link (default: unshaped)")
    p.add_argument("--prefix", default=None)
    p.add_argument("--hold", type=float, default=0.0, help="tear down after this many seconds (0: wait)")
    p.set_defaults(fn=_cmd_up)
    p = sub.add_parser("probe", help="time gloo all-reduces across the sites through torchrun")
    p.add_argument("--sites", type=int, default=2)
    p.add_argument("--rates", default="50,200", help="comma-separated Mbit/s, measured in turn (empty: unshaped)")
    p.add_argument("--size-mb", type=float, default=4.0, help="tensor size in MB (10^6 bytes) of float32")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--prefix", default=None)
    p.add_argument("--json", action="store_true", help="also print each rate's reports as a JSON line")
    p.add_argument("--op", choices=PROBE_OPS, default="all_reduce", help="the collective timed")
    p.add_argument("--idle-s", type=_idle_seconds, default=0.0, help="seconds of idle link before each collective")
    p.set_defaults(fn=_cmd_probe)
    args = ap.parse_args(argv)
    try:
        return int(args.fn(args))
    except LabError as exc:
        print(f"netlab: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
