"""Direct HTTPS on the callback port, for installations without a terminating ingress.

The server's `SSLContext` is built once; when the certificate or key file changes
(a renewed certificate, a Kubernetes Secret update) the new pair is loaded into the
same context, so new connections get it without a restart and open ones are not
disturbed. A pair that does not load (half-written, key not matching) is refused
and the previous one stays in use.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from bridge.edge.auth import file_signature

log = logging.getLogger("bridge.edge.tls")


class TLSError(Exception):
    """The certificate or key cannot be used; the message names the variables."""


def _load(context: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    try:
        context.load_cert_chain(cert_file, key_file)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or "unusable"
        raise TLSError(
            "cannot load LUMA_BRIDGE_TLS_CERT_FILE / LUMA_BRIDGE_TLS_KEY_FILE "
            f"({cert_file}, {key_file}): {reason}"
        ) from None


def server_context() -> ssl.SSLContext:
    """TLS 1.2 or later with the standard library's secure defaults."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ReloadingTLS:
    """An `SSLContext` that follows its certificate and key files."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self.context = server_context()
        self._seen = self._signature()
        _load(self.context, cert_file, key_file)  # raises TLSError: the bridge does not start

    def _signature(self) -> tuple[object, object]:
        return (file_signature(self.cert_file), file_signature(self.key_file))

    def reload(self) -> bool:
        """Load the files again if they changed; True when the new pair is in use."""
        seen = self._signature()
        if seen == self._seen:
            return False
        try:
            _load(server_context(), self.cert_file, self.key_file)  # try it on a spare first
            _load(self.context, self.cert_file, self.key_file)
        except TLSError as exc:
            # Often a rotation caught half-way: look again at the next check.
            log.warning("keeping the previous certificate", extra={"fields": {"reason": str(exc)}})
            return False
        self._seen = seen
        log.info("certificate reloaded", extra={"fields": {"cert": str(self.cert_file)}})
        return True
