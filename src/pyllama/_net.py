"""Which addresses are loopback: the default the network commands bind to (``pyllama serve``,
``pyllama rpc-server``) and the check that decides whether binding elsewhere needs a warning
or an explicit opt-in."""

#: Where pyllama listens unless told otherwise: reachable from this machine only.
LOOPBACK_HOST = "127.0.0.1"

_LOOPBACK_NAMES = frozenset({LOOPBACK_HOST, "localhost", "::1", "[::1]"})


def is_loopback(host: str) -> bool:
    """True when `host` is reachable from this machine only (127.0.0.0/8, localhost, ::1)."""
    return host in _LOOPBACK_NAMES or host.startswith("127.")
