"""Single sign-on as the engine's ``/ovirt-engine/sso`` answers the SDK: password grant, token, revoke.

Tokens live in memory only: a restarted engine forgets them, and the SDK logs in again on the 401.
"""

from __future__ import annotations

import base64
import hmac
import secrets
import threading
import time

from lab.engine.http import HttpError, Reply, Request, json_reply

TOKEN_TTL = 3600 * 10  # the engine's default SSO session lifetime is hours; tests never reach it


class Sso:
    """Users (``user@profile`` -> password) and live tokens."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users
        self._tokens: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def _check(self, username: str, password: str) -> str | None:
        """The error text the engine gives, or None when the credentials are good."""
        if "@" not in username:
            return "Cannot authenticate user: No valid profile found in credentials.."
        expected = self.users.get(username)
        if expected is None or not hmac.compare_digest(expected, password):
            return f"Cannot authenticate user '{username}': The username or password is incorrect.."
        return None

    def token(self, req: Request) -> Reply:
        form = _form(req)
        if form.get("grant_type") != "password":
            return json_reply({"error_code": "unsupported_grant_type", "error": "Unsupported grant type."}, 400)
        username = form.get("username", "")
        err = self._check(username, form.get("password", ""))
        if err:
            # What the engine sends: OAuth-style error_code/error, which the SDK turns into AuthError.
            return json_reply({"error_code": "access_denied", "error": err}, 400)
        tok = secrets.token_urlsafe(48)
        with self._lock:
            self._tokens[tok] = (username, time.time() + TOKEN_TTL)
        return json_reply({
            "access_token": tok,
            "scope": form.get("scope", "ovirt-app-api"),
            "exp": str(int((time.time() + TOKEN_TTL) * 1000)),
            "token_type": "bearer",
        })

    def logout(self, req: Request) -> Reply:
        tok = _form(req).get("token", "")
        with self._lock:
            self._tokens.pop(tok, None)
        return json_reply({})

    def user(self, req: Request) -> str:
        """The authenticated user of an API request, or a 401."""
        auth = req.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            with self._lock:
                entry = self._tokens.get(auth[7:].strip())
            if entry and entry[1] > time.time():
                return entry[0]
        elif auth.startswith("Basic "):
            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                user, pw = "", ""
            if self._check(user, pw) is None:
                return user
        raise HttpError(401, "Unauthorized")


def _form(req: Request) -> dict[str, str]:
    from urllib.parse import parse_qsl

    form = dict(req.query)
    if req.body:
        form.update(parse_qsl(req.body.decode(), keep_blank_values=True))
    return form
