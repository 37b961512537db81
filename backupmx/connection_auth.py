"""AUTH over a connection (RFC 4954): the SASL exchange, the password check off the loop, the failure's delay.

AuthAnswers is the part of connection.SMTPConnection (one of its bases) that
answers the session's AuthRequest and AuthResponse: a client over
max_auth_failures_per_client is refused before any check (auth_limit.py);
each step of the exchange (auth.sasl_exchange) is a challenge, or
credentials to check on the Offload (scrypt, ~60 ms: never on the event
loop), whose answer comes back through the worker loop (_auth_checked). A
failed check is answered only after its delay (auth_failure_delay, longer
with each failure: the connection's `auth_due` deadline), so guessing gets
slow. It uses what the connection holds (ctx, session, client_ip, `closed`,
the exchange's attributes set in its __init__) and goes on with the session
as the connection does (_after_session, on_writable).
"""

import logging
from concurrent.futures import Future

from backupmx.auth import Accepted, Credentials, SASLSyntaxError, after_verification, sasl_exchange
from backupmx.auth_limit import BLOCKED
from backupmx.log import log_event
from backupmx.smtp import AuthRequest, AuthResponse


class AuthAnswers:
    """The AUTH events of an SMTPConnection (module docstring); not used on its own."""

    def _auth_step(self, event: AuthRequest | AuthResponse) -> None:
        """One step of the SASL exchange (auth.sasl_exchange): a challenge, or credentials to check."""
        if isinstance(event, AuthRequest):
            failures = self.ctx.auth_limit.failures_if_blocked(self.client_ip)
            if failures is not None:
                return self._auth_blocked(failures)
            self._sasl = sasl_exchange(event.mechanism, self.ctx.config.hostname, self.ctx.authenticator)
            response = event.initial_response
        else:
            response = event.response
        try:
            step = self._sasl.step(response)
        except SASLSyntaxError:
            self._sasl = None
            return self.session.auth_malformed()
        if isinstance(step, bytes):
            return self.session.auth_challenge(step)
        if isinstance(step, Accepted):  # the client took our proof (SCRAM's server-final)
            self._sasl = None
            return self._authenticated(step.credentials)
        self._sasl, self._auth_checking = None, step
        self.ctx.offload.submit(self, self.ctx.auth_limit.check, self.ctx.authenticator.verify, step, self.client_ip,
                                then=self._auth_checked)

    def _auth_blocked(self, failures: int | None) -> None:
        """max_auth_failures_per_client reached: 421 and the end (auth_limit.py)."""
        log_event(self.ctx.logger, "auth-blocked", client=self.client_ip, failures=failures,
                  window=f"{self.ctx.config.auth_failure_window:g}s", level=logging.WARNING)
        self.session.auth_blocked()

    def _auth_checked(self, future: Future) -> None:
        """The check is done (the worker loop calls this): answer, a failure only after its delay."""
        credentials, self._auth_checking = self._auth_checking, None
        try:
            verified = future.result()
        except Exception as exc:  # a check that broke is a failed check, never a login
            log_event(self.ctx.logger, "auth-error", client=self.client_ip, error=f"{type(exc).__name__}: {exc}",
                      level=logging.ERROR)
            verified = None
        if self.closed:
            return
        if verified is BLOCKED:
            self._auth_blocked(None)
            self._after_session()
            return self.on_writable()
        if verified and verified.final is not None:
            # RFC 4954 4: our last word (SCRAM's server signature) in a 334; 235 after the client's answer.
            self._sasl = after_verification(credentials)
            self.session.auth_challenge(verified.final)
            self._after_session()
            return self.on_writable()
        if verified:
            self._authenticated(credentials)
            self._after_session()
            return self.on_writable()
        log_event(self.ctx.logger, "auth-failed", client=self.client_ip, user=credentials.username,
                  mechanism=credentials.mechanism, level=logging.WARNING)
        # Each failure waits longer before its answer: guessing gets slow.
        self._auth_due = self.ctx.clock() + self.ctx.config.auth_failure_delay * (self.session.auth_failures + 1)

    def _authenticated(self, credentials: Credentials) -> None:
        log_event(self.ctx.logger, "auth", client=self.client_ip, user=credentials.username,
                  mechanism=credentials.mechanism)
        self.session.auth_result(credentials.username)
