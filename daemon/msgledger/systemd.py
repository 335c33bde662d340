"""What msgledger speaks of systemd's protocols, a few lines each, and no-ops when not
run by systemd:

- notify (`Type=notify`): one datagram to $NOTIFY_SOCKET;
- socket activation (`msgledger.socket`): the listening sockets systemd holds for us, so
  that connections made while the service restarts wait in the kernel's queue instead of
  being refused.
"""

from __future__ import annotations

import os
import socket
from collections.abc import MutableMapping


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd; False when there is no one to tell."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(state.encode())
    return True


LISTEN_FDS_START = 3  # sd_listen_fds(3): the first passed descriptor


def listen_fds(environ: MutableMapping[str, str] | None = None) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process (socket activation, sd_listen_fds(3)),
    each with its `FileDescriptorName=`; [] when none were passed. Passed to another
    process (`LISTEN_PID` not ours: inherited through a process that did not take them),
    they are not ours to serve. Either way the variables are removed, so that no child of
    ours takes them for its own."""
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    names = env.pop("LISTEN_FDNAMES", "").split(":")
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return []
    passed = []
    for index in range(int(count)):
        fd = LISTEN_FDS_START + index
        os.set_inheritable(fd, False)  # a front gets the listener by pass_fds, nothing else
        passed.append((names[index] if index < len(names) else "unknown",
                       socket.socket(fileno=fd)))
    return passed
