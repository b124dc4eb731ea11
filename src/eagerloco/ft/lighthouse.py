"""The coordination point of a fault-tolerant run: torchft's lighthouse plus one small key-value store.

One process per run hosts both (``eagerloco ft-lighthouse``, or :class:`LighthouseHost` in Python):

* the **lighthouse** (torchft's ``LighthouseServer``) forms the quorums: which workers are alive at a sync point;
* the **coordination store** (a ``torch.distributed.TCPStore``) holds one decision record per outer average
  (apply or drop, written once by compare-and-set, read by every member: ALGORITHMS.md section 11) and the
  first worker's model fingerprint (start-up check).

Both must outlive any worker: run them on a machine that stays up (or at the site that never fails). They carry
a few hundred bytes per outer step; the outer gradients never pass through them.
"""

from __future__ import annotations

import re
from datetime import timedelta

from eagerloco.ft._deps import require_torchft


def url_host(host: str) -> str:
    """``host`` as it goes into a URL or a ``HOST:PORT`` string: an IPv6 address in brackets."""
    host = bare_host(host)
    return f"[{host}]" if ":" in host else host


def bare_host(host: str) -> str:
    """``host`` as sockets and ``TCPStore`` take it: an IPv6 address without brackets."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


class LighthouseHost:
    """torchft's lighthouse and the coordination store, in this process.

    Args:
        host: the address workers use to reach this machine (advertised; ``127.0.0.1`` on one machine; an IPv6
            address with or without brackets).
        lighthouse_port: port of the lighthouse (0: any free port).
        store_port: port of the coordination store (0: any free port).
        min_replicas: smallest quorum the lighthouse forms (workers wait for at least this many).
        join_timeout_ms: how long the lighthouse waits for more workers once it could form a quorum without
            them (a worker that died is left out after at most this, or the heartbeat timeout).
        heartbeat_timeout_ms: a worker whose heartbeats stop for this long counts as dead.
        quorum_tick_ms: how often the lighthouse re-evaluates a pending quorum.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        lighthouse_port: int = 0,
        store_port: int = 0,
        *,
        min_replicas: int = 1,
        join_timeout_ms: int = 10000,
        heartbeat_timeout_ms: int = 2000,
        quorum_tick_ms: int = 10,
    ) -> None:
        if min_replicas < 1:
            raise ValueError(f"min_replicas must be >= 1, got {min_replicas}")
        for name, value in (("join_timeout_ms", join_timeout_ms), ("heartbeat_timeout_ms", heartbeat_timeout_ms),
                            ("quorum_tick_ms", quorum_tick_ms)):  # fmt: skip
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        require_torchft()
        from torch.distributed import TCPStore
        from torchft.coordination import LighthouseServer

        self.host = bare_host(host)
        self.server = LighthouseServer(
            bind=f"[::]:{lighthouse_port}",
            min_replicas=min_replicas,
            join_timeout_ms=join_timeout_ms,
            quorum_tick_ms=quorum_tick_ms,
            heartbeat_timeout_ms=heartbeat_timeout_ms,
        )
        self.store = TCPStore(
            "0.0.0.0", store_port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
        )

    @property
    def lighthouse_addr(self) -> str:
        """``http://HOST:PORT`` of the lighthouse, for :class:`eagerloco.ft.FaultTolerance`."""
        port = int(re.sub(r".*:(\d+)/?$", r"\1", self.server.address()))
        return f"http://{url_host(self.host)}:{port}"

    @property
    def store_addr(self) -> str:
        """``HOST:PORT`` of the coordination store, for :class:`eagerloco.ft.FaultTolerance`."""
        return f"{url_host(self.host)}:{self.store.port}"

    def shutdown(self) -> None:
        """Stop the lighthouse (the store stops with this process)."""
        self.server.shutdown()


def main(argv: list[str] | None = None) -> int:
    """``python -m eagerloco.ft.lighthouse``: host the lighthouse and the coordination store until interrupted."""
    import argparse
    import signal
    import threading

    parser = argparse.ArgumentParser(
        prog="python -m eagerloco.ft.lighthouse",
        description="Host a fault-tolerant run's lighthouse (torchft) and coordination store; print their "
        "addresses; run until Ctrl+C / SIGTERM.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the workers use to reach this machine")
    parser.add_argument("--port", type=int, default=29510, help="lighthouse port (0: any free port)")
    parser.add_argument("--store-port", type=int, default=29511, help="coordination store port (0: any)")
    parser.add_argument("--min-replicas", type=int, default=1, help="smallest quorum (workers) to train in")
    parser.add_argument("--join-timeout-ms", type=int, default=10000,
                        help="how long to wait at a sync point for a live member of the previous quorum")  # fmt: skip
    parser.add_argument("--heartbeat-timeout-ms", type=int, default=2000)
    args = parser.parse_args(argv)
    try:
        host = LighthouseHost(args.host, args.port, args.store_port, min_replicas=args.min_replicas,
                              join_timeout_ms=args.join_timeout_ms,
                              heartbeat_timeout_ms=args.heartbeat_timeout_ms)  # fmt: skip
    except (ValueError, ImportError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    print(f"lighthouse {host.lighthouse_addr} store {host.store_addr}", flush=True)
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: done.set())
    done.wait()
    host.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
