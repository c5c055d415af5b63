"""Who may write: the shared-secret token Luma carries in the callback URL.

Luma signs nothing, so the URL's token is the only credential. It may come as
the last path segment, as `?token=`, or as `Authorization: Bearer`, and is
compared in constant time against every accepted token.
"""

from __future__ import annotations

import hmac

from aiohttp import web

TOKEN_MATCH = "token"  # noqa: S105 - the name of a route parameter, not a secret
_MASK = "***"


class TokenAuth:
    """Checks a request's token against the accepted ones (several, for rotation)."""

    def __init__(self, tokens: tuple[bytes, ...], *, allow_unauthenticated: bool) -> None:
        self._tokens = tokens
        self._open = allow_unauthenticated and not tokens

    def is_authorized(self, request: web.Request) -> bool:
        if self._open:
            return True
        matched = False
        for candidate in presented_tokens(request):
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


def masked_path(request: web.Request) -> str:
    """The request path safe to log: a path token and any query string are masked."""
    path = request.path
    if request.match_info.get(TOKEN_MATCH):
        path = path.rsplit("/", 1)[0] + "/" + _MASK
    return path + ("?" + _MASK if request.query_string else "")
