"""The S3-compatible API of a node: SigV4 (sigv4), XML (xml), errors, access keys (keys),
the KV index of buckets, objects and uploads (index), and the aiohttp application (app) that
an agent mounts on its own listener: ``build_s3_app(...)``."""

from cim_place.http.s3.app import S3Node, build_s3_app
from cim_place.http.s3.keys import S3Key, ensure_operator_key

__all__ = ["S3Key", "S3Node", "build_s3_app", "ensure_operator_key"]
