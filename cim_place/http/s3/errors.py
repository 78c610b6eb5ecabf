"""S3 errors: the code, the HTTP status and the XML body a client parses."""

from __future__ import annotations

from xml.sax.saxutils import escape

from cim_place.errors import CimPlaceError

_STATUS = {
    "AccessDenied": 403,
    "InvalidAccessKeyId": 403,
    "SignatureDoesNotMatch": 403,
    "RequestTimeTooSkewed": 403,
    "NoSuchBucket": 404,
    "NoSuchKey": 404,
    "NoSuchUpload": 404,
    "BucketNotEmpty": 409,
    "BucketAlreadyOwnedByYou": 409,
    "MethodNotAllowed": 405,
    "PreconditionFailed": 412,
    "InvalidRange": 416,
    "NotImplemented": 501,
    "InternalError": 500,
    "ServiceUnavailable": 503,
    "SlowDown": 503,
    "EntityTooLarge": 400,
    "MissingContentLength": 411,
}


class S3Error(CimPlaceError):
    """An S3 error answer: ``code`` (NoSuchKey, ...), HTTP ``status``, a message."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        self.code = code
        self.status = status if status is not None else _STATUS.get(code, 400)
        self.message = message
        super().__init__(f"{code}: {message}")

    def body(self, resource: str = "", request_id: str = "") -> bytes:
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n<Error>'
            f"<Code>{escape(self.code)}</Code><Message>{escape(self.message)}</Message>"
            f"<Resource>{escape(resource)}</Resource><RequestId>{escape(request_id)}</RequestId>"
            "</Error>"
        ).encode()


def no_such_bucket(bucket: str) -> S3Error:
    return S3Error("NoSuchBucket", f"the bucket {bucket!r} does not exist")


def no_such_key(key: str) -> S3Error:
    return S3Error("NoSuchKey", f"the key {key!r} does not exist")
