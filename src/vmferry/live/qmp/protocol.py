"""QMP messages, sans-IO: the greeting, requests, replies and events (QEMU's docs/interop/qmp-spec).

:class:`JsonStream` splits the bytes a client sends into JSON objects (QMP
needs no newlines between them); :class:`Session` is the per-connection
state machine: before ``qmp_capabilities`` only that command is accepted,
afterwards every command is looked up by the server.  Replies and events are
plain dicts; :func:`dumps` writes them the way QEMU does, one per line.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass
from typing import Any

MAX_REQUEST = 1 << 20  # bytes of one pending request; QEMU caps its parser similarly
#: How deep a request may nest objects and arrays.  QEMU allows 1024; Python's parser (and ``json.dumps`` of
#: an echoed ``id``) would hit the interpreter's recursion limit near 1000, so vmferry stops well before.
MAX_NESTING = 64
NESTING_ERROR = "JSON nesting depth limit exceeded"

# QMP error classes (qapi/error.json).
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"


class QMPProtocolError(Exception):
    """The client broke the protocol so badly that the connection must close."""


@dataclass
class Request:
    name: str
    arguments: dict[str, Any]
    id: Any = None
    has_id: bool = False


class CommandFailed(Exception):
    """Raised by a command handler: becomes ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def greeting(major: int, minor: int, micro: int, package: str) -> dict[str, Any]:
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": package},
                    "capabilities": []}}


def reply(value: Any, req: Request | None) -> dict[str, Any]:
    out: dict[str, Any] = {"return": {} if value is None else value}
    if req is not None and req.has_id:
        out["id"] = req.id
    return out


def error(desc: str, error_class: str = GENERIC_ERROR, req: Request | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if req is not None and req.has_id:
        out["id"] = req.id
    return out


def event(name: str, data: dict[str, Any] | None = None, now: float | None = None) -> dict[str, Any]:
    t = time.time() if now is None else now
    out: dict[str, Any] = {"event": name}
    if data is not None:
        out["data"] = data
    out["timestamp"] = {"seconds": int(t), "microseconds": int((t - int(t)) * 1e6)}
    return out


def dumps(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(", ", ": ")).encode() + b"\r\n"


class JsonStream:
    """Bytes in, JSON values out (whitespace between values is skipped)."""

    def __init__(self, limit: int = MAX_REQUEST) -> None:
        self._buf = ""
        self._pending = b""
        self._limit = limit
        self._decoder = json.JSONDecoder()

    def feed(self, data: bytes) -> list[Any]:
        """Everything complete so far; a value that is not JSON comes out as a ValueError instance."""
        raw = self._pending + data
        try:
            text = raw.decode("utf-8")
            self._pending = b""
        except UnicodeDecodeError as e:
            if e.start >= len(raw) - 3 and e.reason == "unexpected end of data":
                text, self._pending = raw[:e.start].decode("utf-8"), raw[e.start:]
            else:
                self._buf = ""
                self._pending = b""
                return [ValueError("invalid UTF-8 in the input")]
        self._buf += text
        out: list[Any] = []
        while True:
            s = self._buf.lstrip(" \t\r\n")
            self._buf = s
            if not s:
                break
            try:
                value, end = self._decoder.raw_decode(s)
                if _nested_deeper(value, MAX_NESTING):
                    out.append(ValueError(NESTING_ERROR))
                    self._buf = s[end:]
                    continue
            except RecursionError:
                # nested deeper than the parser can follow: skip the value whole, answer an error
                stop = _value_end(s)
                if stop is None:
                    if len(s) > self._limit:
                        self._buf = ""
                        raise QMPProtocolError(f"request larger than {self._limit} bytes") from None
                    break
                out.append(ValueError(NESTING_ERROR))
                self._buf = s[stop:]
                continue
            except ValueError as e:
                if _incomplete(s):
                    if len(s) > self._limit:
                        self._buf = ""
                        raise QMPProtocolError(f"request larger than {self._limit} bytes")
                    break
                out.append(ValueError(f"JSON parse error, {e}"))
                nl = s.find("\n")
                self._buf = s[nl + 1:] if nl >= 0 else ""
                continue
            out.append(value)
            self._buf = s[end:]
        return out


def _nested_deeper(value: Any, limit: int) -> bool:
    """Whether ``value`` nests objects and arrays more than ``limit`` deep (walked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return False


def _value_end(s: str) -> int | None:
    """Where the object or array that starts ``s`` ends (strings respected), None if it has not all arrived."""
    depth, in_str, esc = 0, False, False
    for i, ch in enumerate(s):
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth <= 0:
                return i + 1
    return None


def _incomplete(s: str) -> bool:
    """Whether ``s`` may be the start of a JSON object that has not fully arrived."""
    return s.startswith("{") and _value_end(s) is None


class State(enum.Enum):
    NEGOTIATING = "negotiating"
    COMMANDS = "commands"


class Session:
    """One client's protocol state: parses requests, gates them on ``qmp_capabilities``."""

    def __init__(self) -> None:
        self.state = State.NEGOTIATING

    def request(self, value: Any) -> Request | dict[str, Any]:
        """A :class:`Request` to execute, or the error reply to send right away."""
        if isinstance(value, ValueError):
            return error(str(value))
        if not isinstance(value, dict):
            return error("QMP input must be a JSON object")
        has_id = "id" in value
        rid = value.get("id")
        probe = Request("", {}, rid, has_id)
        if "execute" in value and "exec-oob" in value:
            return error("QMP input must not have both 'execute' and 'exec-oob'", req=probe)
        if "exec-oob" in value:
            return error("QMP input member 'exec-oob' is not allowed: out-of-band is not enabled", req=probe)
        name = value.get("execute")
        if not isinstance(name, str):
            return error("QMP input member 'execute' must be a string" if "execute" in value
                         else "QMP input lacks member 'execute'", req=probe)
        extra = set(value) - {"execute", "arguments", "id", "control"}
        if extra:
            return error(f"QMP input member '{sorted(extra)[0]}' is unexpected", req=probe)
        args = value.get("arguments", {})
        if not isinstance(args, dict):
            return error("QMP input member 'arguments' must be an object", req=probe)
        req = Request(name, args, rid, has_id)
        if self.state is State.NEGOTIATING:
            if name != "qmp_capabilities":
                return error("Expecting capabilities negotiation with 'qmp_capabilities'", COMMAND_NOT_FOUND, req)
            enable = args.get("enable", [])
            if enable:
                return error(f"Parameter 'enable' lists unknown capability {enable[0]!r}" if isinstance(enable, list)
                             and enable else "Parameter 'enable' expects a list", req=req)
            self.state = State.COMMANDS
            return reply({}, req)
        if name == "qmp_capabilities":
            return error("Capabilities negotiation is already complete, command ignored", COMMAND_NOT_FOUND, req)
        return req


__all__ = ["COMMAND_NOT_FOUND", "CommandFailed", "GENERIC_ERROR", "JsonStream", "MAX_NESTING", "QMPProtocolError",
           "Request",
           "Session", "dumps", "error", "event", "greeting", "reply"]
