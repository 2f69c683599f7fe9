"""A tiny sd_notify client: tells systemd when the daemon is ready, alive and stopping.

systemd's `Type=notify` waits for `READY=1` before it counts the service as started, and
`WatchdogSec=` restarts it when `WATCHDOG=1` stops arriving. The protocol is one datagram of
newline-separated `KEY=value` lines to the AF_UNIX socket named by `NOTIFY_SOCKET`; an address
that starts with `@` is in Linux's abstract namespace. Outside systemd (a container, a terminal)
`NOTIFY_SOCKET` is unset and every call does nothing, so the daemon calls them unconditionally.

Like `sd_notify(3)`, a failed send is reported by the return value, never raised: losing contact
with the service manager must not take the detector down with it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

__all__ = ["SystemdNotifier"]


class SystemdNotifier:
    """Sends state changes to the service manager at `address`; does nothing when it is None."""

    def __init__(self, address: str | None, watchdog_usec: str | None = None) -> None:
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> SystemdNotifier:
        """The notifier systemd asked for, or one that does nothing when not run by systemd.

        The watchdog is ours only when `WATCHDOG_PID` is unset or names this process: a child
        that inherited the environment must not keep its parent's watchdog alive.
        """
        watchdog_pid = environ.get("WATCHDOG_PID")
        watchdog_usec = environ.get("WATCHDOG_USEC")
        if watchdog_pid is not None and watchdog_pid != str(os.getpid()):
            watchdog_usec = None
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between `watchdog()` calls: half of `WatchdogSec`, as systemd advises."""
        try:
            usec = int(self._watchdog_usec or "")
        except ValueError:
            return None
        return usec / 2_000_000 if usec > 0 else None

    def ready(self) -> bool:
        """Start-up is complete: the model is loaded and the consumer has joined its group."""
        return self.notify("READY=1")

    def watchdog(self) -> bool:
        """The processing loop is still making progress."""
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status shown by `systemctl status`; line breaks become spaces."""
        return self.notify("STATUS=" + " ".join(text.splitlines()))

    def stopping(self) -> bool:
        """Shutdown has begun (offsets are being committed); systemd waits `TimeoutStopSec`."""
        return self.notify("STOPPING=1")

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=value` assignments in one datagram; True when it was sent."""
        if self.address is None:
            return False
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.sendto("\n".join(assignments).encode(), target)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
