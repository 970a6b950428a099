"""Errors that carry the HTTP status they map to; the CLI prints them as one line."""

from http import HTTPStatus


class NnunetBentoError(Exception):
    """Base error: its message speaks to the operator, its status to the HTTP client."""

    status_code: HTTPStatus = HTTPStatus.INTERNAL_SERVER_ERROR


class RequestError(NnunetBentoError):
    """The request is malformed or does not fit the model (HTTP 400)."""

    status_code = HTTPStatus.BAD_REQUEST


class InputNotFoundError(NnunetBentoError):
    """An input path named by the request does not exist (HTTP 404)."""

    status_code = HTTPStatus.NOT_FOUND


class ForbiddenPathError(NnunetBentoError):
    """A request path lies outside its configured root or its study (HTTP 403).

    The message names the request field, never the resolved server path.
    """

    status_code = HTTPStatus.FORBIDDEN


class DeviceUnavailableError(NnunetBentoError):
    """No GPU had the free memory the model needs before the wait ran out (HTTP 503)."""

    status_code = HTTPStatus.SERVICE_UNAVAILABLE


class ConflictError(NnunetBentoError):
    """The request collides with existing or running work, e.g. on output_dir (HTTP 409)."""

    status_code = HTTPStatus.CONFLICT


class TooLargeError(NnunetBentoError):
    """An input, an upload or a result is past a configured bound (HTTP 413)."""

    status_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class UpstreamError(NnunetBentoError):
    """A DICOM node or another upstream service could not be reached or failed (HTTP 502)."""

    status_code = HTTPStatus.BAD_GATEWAY


class InsufficientStorageError(NnunetBentoError):
    """The output folder's disk is full (HTTP 507)."""

    status_code = HTTPStatus.INSUFFICIENT_STORAGE


class RequestTimeoutError(NnunetBentoError):
    """The request ran past NNUNET_BENTO_REQUEST_TIMEOUT_S and was stopped (HTTP 504)."""

    status_code = HTTPStatus.GATEWAY_TIMEOUT


class ModelFolderError(NnunetBentoError):
    """A folder is not a usable nnU-Net result folder."""


class SpecError(NnunetBentoError):
    """model-serve-spec.yaml is invalid; raised at start-up, never inside a request."""


def error_for_status(status_code: int, message: str) -> NnunetBentoError:
    """Rebuild the error that a status code stands for, e.g. after it crossed a process."""
    for error_class in NnunetBentoError.__subclasses__():
        if error_class.status_code == status_code != HTTPStatus.INTERNAL_SERVER_ERROR:
            return error_class(message)
    return NnunetBentoError(message)


class WorkFolderError(NnunetBentoError):
    """The work folder is not private to this user; raised at start-up."""
