"""Domain errors; the gRPC servicer and the REST routes map each to a status code."""


class DomainError(Exception):
    """Base class: the message is safe to show to the caller."""


class InvalidArgumentError(DomainError):
    """The request is malformed or out of bounds (gRPC INVALID_ARGUMENT, HTTP 422/400)."""


class NotFoundError(DomainError):
    """The named object does not exist (gRPC NOT_FOUND, HTTP 404)."""


class UnauthenticatedError(DomainError):
    """Unknown, revoked or missing credential (gRPC UNAUTHENTICATED, HTTP 401)."""


class ConflictError(DomainError):
    """The request conflicts with the current state (gRPC FAILED_PRECONDITION, HTTP 409)."""


class PermissionDeniedError(DomainError):
    """The credential is known but may not do this (an expired, revoked or used-up enrollment
    token; gRPC PERMISSION_DENIED, HTTP 403)."""


class ForbiddenError(DomainError):
    """A valid credential without the permission the call needs (gRPC PERMISSION_DENIED, HTTP 403)."""
