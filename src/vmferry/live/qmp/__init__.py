"""QMP for vmferry endpoints: a server (:mod:`.server`), its sans-IO protocol (:mod:`.protocol`), and a
blocking client over the ``qemu.qmp`` library (:mod:`.client`) for the management tool."""

from .client import QMPCommandError, QMPConnectError, QMPConnection
from .protocol import CommandFailed
from .server import QMPServer, parse_qmp_address

__all__ = ["CommandFailed", "QMPCommandError", "QMPConnectError", "QMPConnection", "QMPServer", "parse_qmp_address"]
