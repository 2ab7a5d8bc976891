"""Domain errors, one module for the whole project.

Every error a user can cause derives from :class:`CoEError` and carries the HTTP status it maps
to; the HTTP layer maps them in one place (``serving/api/errors.py``) and the CLI prints
``str(error)`` and exits non-zero. Messages name what was wrong and what is allowed.
"""

from __future__ import annotations


class CoEError(Exception):
    """Base of every error the project raises on purpose."""

    status_code: int = 400
    code: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ConfigError(CoEError):
    """A config file or value is malformed (names the field, the value and what is allowed)."""

    status_code = 422


class ModelNotFoundError(CoEError):
    """A model reference (alias, path or hub id) cannot be loaded."""

    status_code = 404
    code = "model_not_found"


class AdapterError(CoEError):
    """An adapter folder is unreadable, not a PEFT adapter, outside the allowed roots, or too large."""

    status_code = 400


class InvalidRequestError(CoEError):
    """A request is well-formed JSON but asks for something not allowed (e.g. max_tokens)."""

    status_code = 400


class ContextLengthError(InvalidRequestError):
    """The prompt (plus max_tokens) does not fit the expert's context window."""

    code = "context_length_exceeded"


class ExpertNotFoundError(CoEError):
    """An expert id is not registered; the message lists the available ones."""

    status_code = 404
    code = "expert_not_found"


class DuplicateExpertError(CoEError):
    """An expert id is already registered."""

    status_code = 409
    code = "conflict"


class RouterNotFoundError(CoEError):
    """An unknown router name; the message lists the registered ones."""

    status_code = 400


class DatasetError(CoEError):
    """A routing dataset is unreadable (names the file and line) or inconsistent."""

    status_code = 400


class UnauthorizedError(CoEError):
    status_code = 401
    code = "unauthorized"


class ForbiddenError(CoEError):
    status_code = 403
    code = "forbidden"


class EngineError(CoEError):
    """An engine failed while serving a request; other experts keep serving."""

    status_code = 503
    code = "engine_unavailable"


class NotReadyError(EngineError):
    """An engine has not finished loading yet."""


class CapacityError(EngineError):
    """A deployment (plan) needs more CPUs/GPUs/memory than the cluster has free; the message names
    the demand per deployment, the free supply and what is missing. Nothing was deployed."""


class RegistryUnavailableError(CoEError):
    """The expert registry's database cannot be reached (at start-up, or an outage while serving).

    While serving, the current expert set keeps serving; registrations and removals are refused
    until the database is back. The message names the database without its password.
    """

    status_code = 503
    code = "registry_unavailable"


class OverloadedError(CoEError):
    """An expert's queue at the ingress is full, or a request waited too long in it (retry later).

    ``retry_after_s`` becomes the ``Retry-After`` header."""

    status_code = 429
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class ServerDownError(EngineError):
    """An expert's server cannot be reached (its replica died or is restarting); fails fast.

    ``retry_after_s`` becomes the ``Retry-After`` header."""

    def __init__(self, message: str, *, retry_after_s: float = 5.0, param: str | None = None) -> None:
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s


class ReplicaLostError(ServerDownError):
    """One replica of an expert server that has several died with the request. The request fails
    (503, ``Retry-After``), but the server is not marked down: its other replicas keep serving."""


class DeadlineExceededError(CoEError):
    """A request got no answer within its deadline (``serving.request_timeout_s``)."""

    status_code = 504
    code = "timeout"


class PayloadTooLargeError(CoEError):
    """A request body is larger than ``serving.limits.max_body_bytes``."""

    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(CoEError):
    """A request body is not declared as JSON (``Content-Type: application/json``)."""

    status_code = 415
    code = "unsupported_media_type"


class ProfileRunningError(CoEError):
    """A profile of this expert is still queued or running (wait for it, or remove the expert)."""

    status_code = 409
    code = "conflict"


def available(names) -> str:
    """Format a list of allowed names for an error message."""
    names = sorted(names)
    return ", ".join(names) if names else "(none)"
