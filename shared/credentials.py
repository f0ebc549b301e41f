"""Secrets on disk and in logs: files only their owner reads, URLs shown without their credentials.

Passwords reach processes inside URLs (``nats://user:password@host:port``, ``redis://:password@host:port``)
and API keys inside settings; neither is ever logged or exported as a metric.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit


def write_private(path: Path, text: str) -> Path:
    """Write a file that only its owner can read (created so: never readable by others, even briefly)."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)
    return path


def redact(url: str) -> str:
    """The URL with any user name and password replaced by '***' (for logs and error messages)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()
