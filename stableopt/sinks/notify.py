"""Notifications on emergencies and divergence: a generic webhook and Telegram.

Both send from a daemon worker thread fed by a bounded queue, so the training
thread only formats a message and enqueues it (microseconds); a slow or dead
endpoint never blocks a step. Per event kind at most one message is sent every
``min_interval_s`` seconds; the repeats in between are dropped and counted, and
the next message of that kind says how many there were. Failures (refused
connections, timeouts, HTTP errors) are logged as warnings (rate-limited) and
counted in :attr:`Notifier.failed`; nothing is ever raised into training.

:meth:`Notifier.close` (called by ``Monitor.close()``) sends what is queued,
waiting at most ``close_timeout_s``; at interpreter exit the queue is drained the
same way, so the ``divergence`` message of a run that dies of
:class:`~stableopt.DivergenceError` still goes out.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
import weakref
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from typing import Any

from stableopt._checks import check_float, check_int
from stableopt.monitor import Event
from stableopt.sinks._common import jsonable

__all__ = ["DEFAULT_NOTIFY_KINDS", "Notifier", "TelegramSink", "WebhookSink"]

log = logging.getLogger(__name__)

#: The event kinds that notify by default: a run in trouble, not its routine.
DEFAULT_NOTIFY_KINDS: tuple[str, ...] = ("lr_cut", "rollback", "divergence", "emergency_clip")

_LOG_FIRST = 5
_LOG_EVERY = 100
_TELEGRAM_MAX_CHARS = 4096  # sendMessage's limit on the text
_STOP = object()


class Notifier(ABC):
    """Base of the notifiers: kind filter, rate limit, worker thread, drain on close.

    A subclass implements :meth:`_send`. Args (shared by every notifier):

    Args:
        kinds: the event kinds that notify (default :data:`DEFAULT_NOTIFY_KINDS`).
        min_interval_s: at most one message per kind per this many seconds
            (default 300.0, ``>= 0``; 0 sends every event).
        timeout_s: the timeout of one HTTP request (default 5.0, ``> 0``).
        queue_size: messages waiting to be sent at most (default 64, ``>= 1``); an
            event that finds the queue full is dropped and counted.
        close_timeout_s: how long :meth:`close` waits for the queue to drain
            (default 10.0, ``>= 0``).
        run_name: a name put in front of every message (default none).

    Attributes:
        sent: messages delivered.
        failed: messages whose request failed.
        rate_limited: events dropped by the rate limit.
        queue_full: events dropped because the queue was full.
        pending: messages queued or in flight, neither sent nor failed yet (after
            :meth:`close`: those it gave up waiting for, an endpoint that accepts and never
            answers). Every event of a notifying kind is exactly one of sent, failed,
            rate_limited, queue_full or pending.
    """

    def __init__(
        self,
        *,
        kinds: Iterable[str] = DEFAULT_NOTIFY_KINDS,
        min_interval_s: float = 300.0,
        timeout_s: float = 5.0,
        queue_size: int = 64,
        close_timeout_s: float = 10.0,
        run_name: str | None = None,
    ) -> None:
        if isinstance(kinds, str):
            raise TypeError(f"kinds must be a collection of event kinds, got the string {kinds!r}")
        self.kinds = frozenset(kinds)
        self.min_interval_s = check_float("min_interval_s", min_interval_s, minimum=0.0)
        self.timeout_s = check_float("timeout_s", timeout_s, minimum=0.0, inclusive_min=False)
        self.close_timeout_s = check_float("close_timeout_s", close_timeout_s, minimum=0.0)
        self.run_name = run_name
        self.sent = self.failed = self.rate_limited = self.queue_full = 0
        self._queued = 0  # accepted into the queue, not yet sent or failed (in flight too)
        self._last_sent: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(check_int("queue_size", queue_size, minimum=1))
        self._closed = False
        self._worker = threading.Thread(
            target=self._work, name=f"stableopt-{type(self).__name__}", daemon=True
        )
        self._worker.start()
        # A run that dies of DivergenceError exits right after its divergence event:
        # drain at exit (atexit runs before daemon threads are stopped).
        self._atexit = functools.partial(_close_at_exit, weakref.ref(self))
        atexit.register(self._atexit)

    def on_event(self, event: Event) -> None:
        """Queue a message for ``event`` if its kind notifies and the rate limit allows."""
        if event.kind not in self.kinds or self._closed:
            return
        now = time.monotonic()
        last = self._last_sent.get(event.kind)
        if last is not None and now - last < self.min_interval_s:
            self.rate_limited += 1
            self._suppressed[event.kind] = self._suppressed.get(event.kind, 0) + 1
            return
        self._last_sent[event.kind] = now
        try:
            with self._lock:
                self._queued += 1
            self._queue.put_nowait((event, self._suppressed.pop(event.kind, 0)))
        except queue.Full:
            with self._lock:
                self._queued -= 1
            self.queue_full += 1

    @property
    def pending(self) -> int:
        """Messages queued or in flight: neither sent nor failed yet."""
        with self._lock:
            return self._queued

    def on_metrics(self, step: int, metrics: Mapping[str, Any]) -> None:  # noqa: B027
        """Nothing: notifiers speak only when something happens."""

    def close(self) -> None:
        """Send what is queued (waiting at most ``close_timeout_s``), then stop the worker."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        deadline = time.monotonic() + self.close_timeout_s
        try:
            self._queue.put(_STOP, timeout=self.close_timeout_s)
        except queue.Full:
            pass
        self._worker.join(max(0.0, deadline - time.monotonic()))
        if self._worker.is_alive() and self.pending:
            log.warning(
                "%s: %d message(s) still pending (queued or in flight: neither sent nor "
                "failed) after close_timeout_s=%g; sent=%d failed=%d",
                type(self).__name__,
                self.pending,
                self.close_timeout_s,
                self.sent,
                self.failed,
            )

    def message(self, event: Event, suppressed: int = 0) -> str:
        """The text of the message for ``event``."""
        run = f"[{self.run_name}] " if self.run_name else ""
        more = (
            f" ({suppressed} more {event.kind} event(s) since the last message)"
            if suppressed
            else ""
        )
        return f"{run}stableopt: step {event.step}: {event.kind}: {event.reason}{more}"

    @abstractmethod
    def _send(self, event: Event, suppressed: int) -> None:
        """Deliver one notification (runs on the worker thread)."""

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                self._send(*item)
                with self._lock:
                    self.sent += 1
                    self._queued -= 1
            except Exception as exc:  # a dead endpoint must never reach training
                with self._lock:
                    self.failed += 1
                    self._queued -= 1
                if self.failed <= _LOG_FIRST or self.failed % _LOG_EVERY == 0:
                    log.warning(
                        "%s could not send the %s notification of step %d to %s: %s: %s%s "
                        "(failure %d; training goes on)",
                        type(self).__name__,
                        item[0].kind,
                        item[0].step,
                        self._where(),
                        type(exc).__name__,
                        exc,
                        _error_body(exc),
                        self.failed,
                    )

    def _where(self) -> str:
        """Where messages go, safe to log (no secrets)."""
        return "?"

    def _post_json(self, url: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> bytes:
        request = urllib.request.Request(
            url,
            data=json.dumps(jsonable(body), allow_nan=False).encode("utf-8"),
            headers={"Content-Type": "application/json", **headers},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
            return bytes(response.read())


def _close_at_exit(ref: weakref.ReferenceType[Notifier]) -> None:
    notifier = ref()
    if notifier is not None:
        notifier.close()


def _error_body(exc: Exception) -> str:
    """The start of an HTTP error's body (Telegram explains itself there: "chat not found")."""
    if not isinstance(exc, urllib.error.HTTPError):
        return ""
    try:
        body = exc.read(300).decode("utf-8", "replace").strip()
    except Exception:
        return ""
    return f" ({body})" if body else ""


class WebhookSink(Notifier):
    """POST a JSON message to a URL for each notifying event.

    The body::

        {"text": "stableopt: step 61: rollback: ...", "source": "stableopt",
         "run": null, "step": 61, "kind": "rollback", "reason": "...",
         "data": {"snapshot_step": 0.0}, "suppressed": 0}

    ``text`` is what Slack and Mattermost incoming webhooks display; the other
    fields are for a receiver of your own. Non-finite numbers are sent as
    ``null`` (strict JSON has no NaN or infinity; the reason says which it was).

    Args:
        url: the endpoint (``http://`` or ``https://``).
        headers: extra HTTP headers (e.g. an ``Authorization`` header).
        **options: ``kinds``, ``min_interval_s``, ``timeout_s``, ``queue_size``,
            ``close_timeout_s``, ``run_name`` (see :class:`Notifier`).
    """

    def __init__(
        self, url: str, *, headers: Mapping[str, str] | None = None, **options: Any
    ) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http:// or https:// URL, got {url!r}")
        self.url = url
        self.headers = dict(headers or {})
        super().__init__(**options)

    def _send(self, event: Event, suppressed: int) -> None:
        body = {
            "text": self.message(event, suppressed),
            "source": "stableopt",
            "run": self.run_name,
            "step": event.step,
            "kind": event.kind,
            "reason": event.reason,
            "data": event.data,
            "suppressed": suppressed,
        }
        self._post_json(self.url, body, self.headers)

    def _where(self) -> str:
        # The path and query of a webhook URL are often its secret (Slack's are).
        scheme, _, rest = self.url.partition("://")
        return f"{scheme}://{rest.split('/', 1)[0]}/..."


class TelegramSink(Notifier):
    """Send each notifying event as a Telegram message (Bot API ``sendMessage``).

    POSTs ``{"chat_id": ..., "text": ...}`` to ``{api_base}/bot{token}/sendMessage``.
    Create a bot with @BotFather for the token; the chat id is yours (or a
    group's) as returned by ``getUpdates`` after you message the bot.

    Args:
        token: the bot token (default: the environment variable
            ``STABLEOPT_TELEGRAM_TOKEN``).
        chat_id: the chat to write to (default: ``STABLEOPT_TELEGRAM_CHAT_ID``).
        api_base: the Bot API server (default ``"https://api.telegram.org"``; a
            local Bot API server or a test server otherwise).
        **options: ``kinds``, ``min_interval_s``, ``timeout_s``, ``queue_size``,
            ``close_timeout_s``, ``run_name`` (see :class:`Notifier`).

    Raises:
        ValueError: no token or no chat id, neither as argument nor in the environment.
    """

    def __init__(
        self,
        token: str | None = None,
        chat_id: str | int | None = None,
        *,
        api_base: str = "https://api.telegram.org",
        **options: Any,
    ) -> None:
        token = token or os.environ.get("STABLEOPT_TELEGRAM_TOKEN")
        chat_id = chat_id or os.environ.get("STABLEOPT_TELEGRAM_CHAT_ID")
        if not token:
            raise ValueError(
                "token is required: pass TelegramSink(token=...) or set STABLEOPT_TELEGRAM_TOKEN"
            )
        if not chat_id:
            raise ValueError(
                "chat_id is required: pass TelegramSink(chat_id=...) or set "
                "STABLEOPT_TELEGRAM_CHAT_ID"
            )
        if not api_base.startswith(("http://", "https://")):
            raise ValueError(f"api_base must be an http:// or https:// URL, got {api_base!r}")
        self._token = token
        self.chat_id = chat_id
        self.api_base = api_base.rstrip("/")
        super().__init__(**options)

    def _send(self, event: Event, suppressed: int) -> None:
        text = self.message(event, suppressed)[:_TELEGRAM_MAX_CHARS]
        url = f"{self.api_base}/bot{self._token}/sendMessage"
        self._post_json(url, {"chat_id": self.chat_id, "text": text}, {})

    def _where(self) -> str:
        return f"{self.api_base}/bot<token>/sendMessage"

    def __repr__(self) -> str:  # never show the token
        return f"TelegramSink(chat_id={self.chat_id!r}, api_base={self.api_base!r})"
