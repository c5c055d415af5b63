"""Who may write: the token Luma carries in the callback URL, and the optional extra checks.

Luma signs nothing, so the URL's token is the only credential Luma can present.
It may come as the last path segment, as `?token=`, or as `Authorization: Bearer`,
and is compared in constant time against every accepted token. Tokens come from
`AUTH_TOKENS` and from `AUTH_TOKENS_FILE`, which is re-read when it changes, so a
token can be rotated without a restart.

`Authenticator` puts the checks together: source allow-list, token, and (when
configured) a Standard Webhooks signature. A failure is one answer (401, same
body) whatever was wrong. The source and the token are both evaluated, whatever
the other said, from the request head, before the body is read: a stranger
cannot make the bridge buffer a body. The signature can only be checked once the
body is in, so a request's timing can tell a wrong token from a wrong signature;
docs/security.md says why that trade is made.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from bridge.edge.access import IPAddress, SourcePolicy
from bridge.edge.signing import Claim, SignatureCheck, body_digest

log = logging.getLogger("bridge.edge.auth")

TOKEN_MATCH = "token"  # noqa: S105 - the name of a route parameter, not a secret
_MASK = "***"
# Compared against when no token was presented, so that path takes as long as a wrong one.
_PLACEHOLDER = b"\0"
MAX_TOKEN_FILE_BYTES = 64 * 1024


class TokenFileError(Exception):
    """AUTH_TOKENS_FILE cannot be read; the message names the variable, never a token."""


def read_token_file(path: Path) -> tuple[bytes, ...]:
    """Tokens from a file: one per line or comma-separated; blank lines and `#` lines skipped."""
    try:
        with path.open("rb") as source:
            text = source.read(MAX_TOKEN_FILE_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(
            f"cannot read LUMA_BRIDGE_AUTH_TOKENS_FILE ({path}): {exc.strerror}"
        ) from None
    if len(text) > MAX_TOKEN_FILE_BYTES:
        raise TokenFileError(
            f"LUMA_BRIDGE_AUTH_TOKENS_FILE ({path}) is larger than {MAX_TOKEN_FILE_BYTES} bytes"
        )
    tokens: list[bytes] = []
    for line in text.splitlines():
        if line.strip().startswith(b"#"):
            continue
        tokens.extend(item.strip() for item in line.split(b",") if item.strip())
    return tuple(tokens)


def file_signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file (or the symlink a Kubernetes Secret mount swaps) changes."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns)


class TokenAuth:
    """Checks a request's token against the accepted ones (several, for rotation).

    `tokens` are fixed (from AUTH_TOKENS); those of `tokens_file` are re-read by
    `reload()` when the file changed. With a tokens file configured a token is
    always required, even while the file is empty (then nothing is accepted).
    """

    def __init__(
        self,
        tokens: tuple[bytes, ...],
        *,
        allow_unauthenticated: bool,
        tokens_file: Path | None = None,
    ) -> None:
        self._fixed = tokens
        self._file = tokens_file
        self._file_tokens: tuple[bytes, ...] = ()
        self._file_seen: tuple[int, int, int] | None = None
        self._tokens = tokens
        self.required = bool(tokens) or tokens_file is not None or not allow_unauthenticated
        if tokens_file is not None:
            self._file_seen = file_signature(tokens_file)
            self._file_tokens = read_token_file(tokens_file)
            self._tokens = self._fixed + self._file_tokens

    @property
    def count(self) -> int:
        return len(self._tokens)

    def reload(self) -> bool:
        """Re-read the tokens file if it changed; True when the accepted tokens changed.

        A file that cannot be read keeps the tokens last read from it (and logs why),
        so a half-written Secret update does not lock Luma out.
        """
        if self._file is None:
            return False
        seen = file_signature(self._file)
        if seen == self._file_seen:
            return False
        try:
            tokens = read_token_file(self._file)
        except TokenFileError as exc:
            log.warning("keeping the previous tokens", extra={"fields": {"reason": str(exc)}})
            return False
        self._file_seen = seen
        changed = tokens != self._file_tokens
        self._file_tokens = tokens
        self._tokens = self._fixed + tokens
        if changed:
            log.info("tokens reloaded", extra={"fields": {"tokens": len(self._tokens)}})
            if not self._tokens:
                log.warning("no tokens accepted: every callback is answered 401")
        return changed

    def is_authorized(self, request: web.Request) -> bool:
        if not self.required:
            return True
        matched = False
        for candidate in presented_tokens(request) or [_PLACEHOLDER]:
            for token in self._tokens:
                # No early exit: the time taken does not tell which part matched.
                matched |= hmac.compare_digest(candidate, token)
        return matched


def presented_tokens(request: web.Request) -> list[bytes]:
    """Every token the request offers, wherever it put it."""
    candidates = []
    if path_token := request.match_info.get(TOKEN_MATCH):
        candidates.append(path_token.encode())
    if query_token := request.query.get("token"):
        candidates.append(query_token.encode())
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        candidates.append(credentials.strip().encode())
    return candidates


@dataclass(frozen=True, slots=True)
class Decision:
    """The result of authenticating one request."""

    authorized: bool
    webhook_id: str | None = None
    # The same webhook id and body were seen before: the sender's retry.
    repeat: bool = False


_AUTHORIZED = Decision(True)
_REFUSED = Decision(False)


class Authenticator:
    """Source allow-list, token and (optional) signature.

    The source and token are checked from the request head, before a byte of the
    body is read (`allowed_before_body`), both of them whatever the other said. The
    signature covers the body, so it is checked once the body is in (`verify_body`).
    """

    def __init__(
        self,
        tokens: TokenAuth,
        *,
        sources: SourcePolicy | None = None,
        signatures: SignatureCheck | None = None,
    ) -> None:
        self.tokens = tokens
        self.sources = sources or SourcePolicy()
        self.signatures = signatures

    def allowed_before_body(self, request: web.Request, source: IPAddress | None) -> bool:
        """Source and token, both checked (no early exit); True when neither is configured."""
        allowed = self.sources.allows(source)
        allowed &= self.tokens.is_authorized(request)
        return allowed

    def verify_body(self, request: web.Request, body: bytes) -> Decision:
        """The signature over `body`, and the webhook id's claim; call after
        `allowed_before_body` held. Without signatures configured, always authorized.

        A new webhook id is claimed with the body's digest; the same id with the same
        body is a `repeat` (authorized: the sender's retry); with another body, refused.
        """
        if self.signatures is None:
            return _AUTHORIZED
        verdict = self.signatures.verify(request.headers, body)
        if not verdict.valid or verdict.webhook_id is None:
            return _REFUSED
        claim = self.signatures.replays.claim(verdict.webhook_id, body_digest(body))
        if claim is Claim.CONFLICT:
            return _REFUSED
        return Decision(True, verdict.webhook_id, repeat=claim is Claim.REPEAT)

    def accepted_event(self, decision: Decision) -> str | None:
        """The event id an earlier delivery under this decision's webhook id was written as."""
        if self.signatures is None or decision.webhook_id is None:
            return None
        return self.signatures.replays.accepted_event(decision.webhook_id)

    def accepted(self, decision: Decision, event_id: str) -> None:
        """Remember that the callback under this decision's webhook id was written."""
        if self.signatures is not None and decision.webhook_id is not None:
            self.signatures.replays.mark_accepted(decision.webhook_id, event_id)

    def release(self, decision: Decision) -> None:
        """Let the sender retry a signed request that was answered with a retryable error."""
        if self.signatures is not None and decision.webhook_id is not None:
            self.signatures.replays.release(decision.webhook_id)


def masked_path(request: web.Request) -> str:
    """The request path safe to log: a path token and any query string are masked.

    A path that matched no route is not logged at all: it may be a token with a typo.
    """
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None:
        return "(no route)"
    path = resource.canonical.replace("{" + TOKEN_MATCH + "}", _MASK)
    return path + ("?" + _MASK if request.query_string else "")
