"""The workers' Redis transport: a queue entry that is not a task message is dropped, not fatal.

Anyone who can write to a queue list can put anything there. Stock kombu raises out of its
event loop on an entry that is not JSON, not an object, or whose body does not decode, and
Celery ends the worker with "Unrecoverable error"; Celery does the same for task headers it
cannot read. Here each such entry is logged, counted (``sortline_malformed_messages_total``)
and dropped, and the worker goes on consuming.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import redis
from celery import current_app
from kombu.transport import redis as kombu_redis
from kombu.transport.virtual import base

from db.text import clean_text
from worker.metrics import record_malformed

log = logging.getLogger(__name__)

TRANSPORT = "worker.transport:Transport"
FULL_CHECK_BYTES = 8 * 2**20  # bodies up to this size are parsed before a task starts
# what reading a hostile entry raises (JSON, base64 and UTF-8 errors are ValueErrors)
_MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, LookupError)


class MalformedMessage(ValueError):
    """A queue entry that is not a kombu message."""


def drop(queue: str | None, reason: Any) -> None:
    """Log and count one dropped entry."""
    text = clean_text(str(reason))[:300]
    log.error("dropped a malformed message from queue %s: %s", clean_text(str(queue)), text)
    record_malformed(str(queue or ""))


def _check_envelope(payload: Any) -> None:
    """Raise :class:`MalformedMessage` unless *payload* has a kombu message's shape."""
    if not isinstance(payload, dict):
        raise MalformedMessage(f"entry is a JSON {type(payload).__name__}, not an object")
    props = payload.get("properties")
    if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), str):
        raise MalformedMessage("entry has no 'properties' with a 'delivery_tag'")
    for key, kind in (("delivery_info", dict), ("body_encoding", str)):
        if props.get(key) is not None and not isinstance(props[key], kind):
            raise MalformedMessage(f"'properties.{key}' is not a {kind.__name__}")
    if payload.get("headers") is not None and not isinstance(payload["headers"], dict):
        raise MalformedMessage("'headers' is not an object")
    for key in ("body", "content-type", "content-encoding"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise MalformedMessage(f"'{key}' is not a string")


def _is_time(v: Any) -> bool:
    if v is None:
        return True
    if not isinstance(v, str):
        return False
    try:
        datetime.fromisoformat(v)
    except ValueError:
        return False
    return True


def task_message_problem(message) -> str | None:
    """What makes *message* something other than a JSON task message of this app, or None."""
    if message.content_type != "application/json":
        return f"disallowed content type {message.content_type!r} (JSON only)"
    if message.content_encoding not in ("utf-8", None):
        return f"unknown content encoding {message.content_encoding!r}"
    h = message.headers or {}
    if "compression" in h:
        return "compressed messages are not accepted"
    task = h.get("task")
    if not isinstance(task, str) or not isinstance(h.get("id"), str):
        return "no task name and id in the headers"
    if task not in current_app.tasks:
        return f"unknown task {task[:100]!r}"
    retries, limits = h.get("retries", 0), h.get("timelimit")
    if not isinstance(retries, int) or isinstance(retries, bool) or retries < 0:
        return "header 'retries' is not a count"
    if limits is not None and not (
        isinstance(limits, list)
        and len(limits) == 2
        and all(x is None or isinstance(x, int | float) for x in limits)
    ):
        return "header 'timelimit' is not a pair of numbers"
    if not (_is_time(h.get("eta")) and _is_time(h.get("expires"))):
        return "header 'eta' or 'expires' is not a time"
    body = message.body
    if isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    if not isinstance(body, bytes):
        return "no body"
    if len(body) > FULL_CHECK_BYTES:  # large bodies (images as bytes): the shape only
        return None if body[:1] == b"[" and body.rstrip()[-1:] == b"]" else "body is not a list"
    try:
        decoded = json.loads(body)
    except ValueError as e:
        return f"body is not JSON: {e}"
    if not (
        isinstance(decoded, list)
        and len(decoded) == 3
        and isinstance(decoded[0], list)
        and isinstance(decoded[1], dict)
        and isinstance(decoded[2], dict)
    ):
        return "body is not [args, kwargs, options]"
    return None


class Message(base.Message):
    """A kombu message that refuses, with :class:`MalformedMessage`, an entry of the wrong shape."""

    def __init__(self, payload: Any, channel=None, **kwargs) -> None:
        _check_envelope(payload)
        try:
            super().__init__(payload, channel=channel, **kwargs)
        except _MALFORMED as e:  # a body that does not decode (bad base64, unknown encoding)
            raise MalformedMessage(f"undecodable body: {type(e).__name__}: {e}") from None


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, dropping entries that are not task messages."""

    Message = Message

    def _connparams(self, asynchronous=False):
        # Closing after the broker went away, kombu restores the unacknowledged messages through
        # a new pool of the closed connection, whose client is already gone: an AttributeError
        # that kills the worker ("Unrecoverable error"). A connection error instead is ignored
        # there, the worker reconnects, and the messages come back by the visibility timeout.
        if self.connection is None or self.connection.client is None:
            raise redis.exceptions.ConnectionError("the broker connection is closed")
        return super()._connparams(asynchronous=asynchronous)

    def _brpop_read(self, **options):
        """Read one entry; one that is not even a message is dropped here (it is off the list)."""
        try:
            return super()._brpop_read(**options)
        except _MALFORMED as e:
            drop(self._last_brpop_queue(), f"{type(e).__name__}: {e}")
            return True

    def _last_brpop_queue(self) -> str | None:
        """The queue the last entry came from (BRPOP's queue cycle rotates it to the end)."""
        try:
            return self._queue_cycle.items[-1]
        except (AttributeError, IndexError):
            return None

    def basic_consume(self, queue, no_ack, callback, consumer_tag, **kwargs):
        """Consume *queue*; an entry the consumer cannot even start as a task is dropped."""
        passthrough = _broker_errors(self.connection)
        tasks = queue in current_app.amqp.queues  # not the control (pidbox) queues

        def guarded(message):
            problem = task_message_problem(message) if tasks else None
            if problem is not None:
                drop(queue, problem)
                message.ack()
                return None
            try:
                return callback(message)
            except passthrough:
                raise
            except Exception as e:  # headers Celery cannot read: acknowledge and drop
                drop(queue, f"{type(e).__name__}: {e}")
                if not message.acknowledged:
                    message.ack()
                return None

        return super().basic_consume(queue, no_ack, guarded, consumer_tag, **kwargs)


def _broker_errors(transport) -> tuple[type[BaseException], ...]:
    """The transport's connection and channel errors, less plain built-ins (it lists KeyError)."""
    errors = (*transport.connection_errors, *transport.channel_errors)
    return tuple(e for e in errors if e.__module__ != "builtins" or issubclass(e, OSError))


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with :class:`Channel`."""

    Channel = Channel
