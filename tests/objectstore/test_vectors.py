"""Root CIDs against the ones kubo computed for the same inputs: every recorded vector.

Inputs are generated while they are imported (never held in memory): kubo's deterministic
ChaCha20 test data for seeded vectors, UTF-8 text for the others. Vectors over 100 MB (the
1 GiB ones) are marked slow; they still run by default.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from cim_place.objectstore.cid import parse, to_str
from cim_place.objectstore.testdata import chacha_stream
from cim_place.objectstore.unixfs import PROFILES, import_file

_SHARED = Path(__file__).resolve().parents[3] / "shared" / "vectors" / "unixfs-kubo.json"
_COPY = Path(__file__).resolve().parent / "vectors" / "unixfs-kubo.json"
_SLOW_BYTES = 100_000_000


def _load() -> dict[str, Any]:
    path = _SHARED if _SHARED.is_file() else _COPY
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


_DOC = _load()


def _size(vector: dict[str, Any]) -> int:
    given = vector["input"]
    return len(given["text"].encode("utf-8")) if "text" in given else int(given["size"])


def _params() -> list[Any]:
    params = []
    for vector in _DOC["vectors"]:
        marks = [pytest.mark.slow] if _size(vector) > _SLOW_BYTES else []
        test_id = f"{vector['name']}-{vector['profile']}"
        params.append(pytest.param(vector, marks=marks, id=test_id))
    return params


def test_profiles_match_the_recorded_ones() -> None:
    for name, recorded in _DOC["profiles"].items():
        profile = PROFILES[name]
        assert profile.cid_version == recorded["cid_version"]
        assert profile.max_links == recorded["max_links"]
        assert recorded["chunker"] == f"fixed {profile.chunk_size} bytes"
        assert profile.raw_leaves == recorded["leaves"].startswith("raw")


@pytest.mark.parametrize("vector", _params())
def test_root_cid_matches_kubo(vector: dict[str, Any]) -> None:
    given = vector["input"]
    if "text" in given:
        stream: Any = io.BytesIO(given["text"].encode("utf-8"))
    else:
        stream = chacha_stream(given["seed"], int(given["size"]))
    result = import_file(stream, None, vector["profile"])
    assert to_str(result.root) == vector["cid"]
    assert result.root == parse(vector["cid"])
    assert result.size == _size(vector)
