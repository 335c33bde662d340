"""The sockets msgledger serves on, and the descriptors it may hold.

- **public** (`http.listen`): the webhooks and `/healthz`; also `/v1` and `/metrics` unless
  they have a listener of their own.
- **admin** (`http.admin_listen`, host:port or a unix socket path): `/v1`, `/metrics` and
  the OpenAPI document, kept off the listener a proxy publishes.

Under systemd socket activation (`systemd/msgledger.socket`) the sockets systemd passes are
served instead of binding: one for the public side, and one named `admin`
(`FileDescriptorName=admin`) for the admin side. systemd keeps them open while the service
restarts, so a connection made meanwhile waits in the kernel's queue for the next process
instead of being refused.

Every listener is opened here, before anything is served, and handed to hypercorn as an
`fd://` bind: one process, or its fronts, serve the very socket systemd holds.
"""

from __future__ import annotations

import os
import resource
import socket
import stat
from dataclasses import dataclass

from . import systemd
from .logs import get_logger
from .settings import ConfigError, Settings, is_loopback

LISTEN_BACKLOG = 1024  # connections waiting for accept; a proxy opens its pool at once
ADMIN_NAME = "admin"  # the FileDescriptorName= of a passed admin socket
log = get_logger("msgledger.listeners")


@dataclass
class Listeners:
    public: socket.socket
    admin: socket.socket | None  # None: everything is served on `public`
    activated: bool  # passed by systemd, not bound here

    def close(self) -> None:
        for sock in (self.public, self.admin):
            if sock is not None:
                sock.close()


def open_listeners(settings: Settings) -> Listeners:
    """The passed sockets if systemd passed any, else bind `http.listen` and, if set,
    `http.admin_listen`. OSError if an address cannot be bound; ConfigError if the passed
    sockets do not fit the configuration."""
    passed = systemd.listen_fds()
    try:
        public, admin = _sort_passed(passed, settings)
    except ConfigError:
        for _, sock in passed:
            sock.close()
        raise
    activated = public is not None
    if public is not None:
        _check_public_url(public, settings)
    if public is None:
        public = bind_tcp(settings.http_listen_host, settings.http_listen_port)
    if admin is None and settings.http_admin_listen is not None:
        try:
            admin = bind_admin(settings.http_admin_listen)
        except OSError:
            public.close()
            raise
    listeners = Listeners(public, admin, activated)
    log.info("listening", public=url_of(public), admin=url_of(admin) if admin else None,
             socket_activation=activated)
    return listeners


def _sort_passed(passed: list[tuple[str, socket.socket]], settings: Settings
                 ) -> tuple[socket.socket | None, socket.socket | None]:
    admin = [sock for name, sock in passed if name == ADMIN_NAME]
    public = [sock for name, sock in passed if name != ADMIN_NAME]
    if len(public) > 1 or len(admin) > 1:
        raise ConfigError(f"LISTEN_FDS: expected one socket and at most one named {ADMIN_NAME!r},"
                          f" got {[name for name, _ in passed]}")
    if admin and settings.http_admin_listen is None:
        raise ConfigError("http.admin_listen: systemd passed an 'admin' socket; set"
                          " http.admin_listen to the address it listens on")
    if admin and not public:
        raise ConfigError("LISTEN_FDS: systemd passed an 'admin' socket but no public one")
    for sock in public + admin:
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError("LISTEN_FDS: expected stream sockets (ListenStream=)")
        if sock.family != socket.AF_UNIX:  # as bind_tcp sets it; accepted sockets inherit
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(LISTEN_BACKLOG)  # systemd's default backlog may be smaller
    return (public[0] if public else None), (admin[0] if admin else None)


def _check_public_url(public: socket.socket, settings: Settings) -> None:
    """As settings check `http.listen`: a passed socket beyond loopback needs
    `http.public_url`, since the address it listens on is not the URL Twilio signs."""
    host = "localhost" if public.family == socket.AF_UNIX else public.getsockname()[0]
    if settings.http_webhooks and settings.http_public_url is None and not is_loopback(host):
        where = url_of(public)
        public.close()
        raise ConfigError("http.public_url: required when the socket systemd passes listens"
                          f" beyond loopback ({where}); signatures are checked against the"
                          " URL Twilio calls")


def bind_tcp(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise _cannot_listen(f"{host}:{port}", error) from None
    return sock


def _cannot_listen(address: str, error: OSError) -> OSError:
    """`error`, naming the address: start_failed's line then says which listener failed."""
    return OSError(error.errno, f"cannot listen on {address}: {error.strerror}")


def bind_admin(address: str) -> socket.socket:
    """host:port, or a unix socket at an absolute path (created under the process umask:
    0600 under the shipped unit's UMask=0077)."""
    if not address.startswith("/"):
        host, _, port = address.rpartition(":")
        return bind_tcp(host.strip("[]"), int(port))
    _remove_stale_socket(address)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
    except OSError as error:
        sock.close()
        raise _cannot_listen(address, error) from None
    return sock


def _remove_stale_socket(path: str) -> None:
    """A socket file left by a process that is gone would make bind fail; anything that is
    not a socket is not ours to remove."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass


def url_of(sock: socket.socket) -> str:
    """http://host:port, or unix:/path, of a listening socket."""
    if sock.family == socket.AF_UNIX:
        return f"unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def fd_bind(fd: int) -> str:
    """A listener's descriptor as a hypercorn bind (a front's, inherited from the main
    process)."""
    return f"fd://{fd}"


def hand_over(sock: socket.socket) -> str:
    """`sock` as a hypercorn bind that owns it from now on (hypercorn closes it)."""
    return fd_bind(sock.detach())


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft limit on open descriptors to the hard one: each client connection
    is one, and a soft limit of 1024 (systemd's default) is reached by a proxy's pool and a
    burst of Twilio's callbacks together. Fronts inherit it. (soft, hard) as it now is."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as error:  # a sandbox may refuse: run with what we have
            log.warning("descriptor_limit_not_raised", error=str(error))
    log.info("descriptor_limit", soft=soft, hard=hard)
    return soft, hard
