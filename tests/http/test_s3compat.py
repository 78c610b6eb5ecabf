"""A slice of ceph's public S3 conformance suite (s3-tests) against a domain's S3 API.

The suite is not part of this repository: point ``S3TESTS_DIR`` at a checkout of
github.com/ceph/s3-tests and ``S3TESTS_PYTHON`` at a Python with its requirements (boto3, munch,
isodate, pytz, python-dateutil, requests, pytest). Without them the test is skipped. It starts
``cim-place up``, writes the suite's configuration with the domain's operator key, runs the
bucket, object, listing and multipart tests, and fails if a test listed in
``s3compat_passing.txt`` (the ones that passed when docs/S3.md was written) no longer passes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

pytestmark = [pytest.mark.nats, pytest.mark.s3compat, pytest.mark.timeout(1800)]

SLICE = (
    "(bucket_list or bucket_create or bucket_delete or object_write or object_read or multipart"
    " or list_objects or object_head or object_copy) and not versioning and not acl and not"
    " policy and not lifecycle and not encryption and not tagging and not sse and not"
    " object_lock and not ownership and not checksum"
)
PASSING = Path(__file__).with_name("s3compat_passing.txt")
CLI = [sys.executable, "-m", "cim_place.cli"]


def _conf(port: str, key: dict[str, str]) -> str:
    users = ""
    for section in ("s3 main", "s3 alt", "s3 tenant", "iam", "iam root", "iam alt root"):
        name = section.replace(" ", "")
        users += (
            f"[{section}]\ndisplay_name = {name}\nuser_id = {name}\nemail = {name}@example.com\n"
            f"access_key = {key['access_key']}\nsecret_key = {key['secret_key']}\n"
            "api_name = default\ntenant = tenant\n"
        )
    return (
        f"[DEFAULT]\nhost = 127.0.0.1\nport = {port}\nis_secure = False\nssl_verify = False\n"
        "[fixtures]\nbucket prefix = s3t-{random}-\n" + users
    )


def test_the_passing_slice_of_s3_tests_still_passes(tmp_path: Path) -> None:
    suite = os.environ.get("S3TESTS_DIR")
    python = os.environ.get("S3TESTS_PYTHON")
    if not suite or not python:
        pytest.skip(
            "S3TESTS_DIR and S3TESTS_PYTHON name a checkout of ceph/s3-tests and its Python"
        )
    env = {k: v for k, v in os.environ.items() if k not in ("CIM_PLACE_SERVER", "CIM_PLACE_DIR")}
    subprocess.run(
        [*CLI, "up", "--leaves", "3", "--detach", "-q"], cwd=tmp_path, env=env, check=True
    )
    try:
        context = json.loads((tmp_path / ".cim-place" / "context.json").read_text())
        port = context["nodes"][0]["s3"].rsplit(":", 1)[1]
        conf = tmp_path / "s3tests.conf"
        conf.write_text(_conf(port, context["s3"]))
        report = tmp_path / "junit.xml"
        subprocess.run(
            [python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             "s3tests/functional/test_s3.py", "-k", SLICE,
             "-m", "not fails_on_rgw and not fails_on_aws", f"--junitxml={report}"],
            cwd=suite, env={**env, "S3TEST_CONF": str(conf)}, check=False, timeout=1500,
        )  # fmt: skip
        passed = {
            case.get("name")
            for case in ET.parse(report).iter("testcase")
            if not any(child.tag in ("failure", "error", "skipped") for child in case)
        }
    finally:
        subprocess.run([*CLI, "down", "-q"], cwd=tmp_path, env=env, check=False)
    expected = {
        line.strip()
        for line in PASSING.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert not expected - passed, f"no longer passing: {sorted(expected - passed)}"
