"""Key records as the stores keep them (ApiKey.to_record / from_record): what another gateway
version wrote is kept, and what cannot be a key is refused by name, not with a TypeError."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.store.base import ApiKey, KeyRecordError, decode_keys
from tests.store.conftest import make_key


def test_fields_this_version_does_not_know_are_kept_and_written_back() -> None:
    record = {**make_key().to_record(), "allowed_ips": ["10.0.0.0/8"], "extra": "a newer field of that name"}
    key = ApiKey.from_record(record)
    assert key.extra == {"allowed_ips": ["10.0.0.0/8"], "extra": "a newer field of that name"}
    changed = key.updated(rpm=5)
    assert changed.to_record() == {**record, "rpm": 5, "updated_at": changed.updated_at}
    assert ApiKey.decode(changed.encode()) == changed
    assert "extra" not in make_key().to_record()  # this version's own records are as before


@pytest.mark.parametrize("raw, reason", [
    ("{not json", "not JSON"),
    ("[1, 2]", "a JSON object was expected"),
    (json.dumps({**make_key().to_record(), "rpm": "ten"}), "$.rpm"),
    (json.dumps({**make_key().to_record(), "models": [1]}), "$.models[0]"),
    (json.dumps({k: v for k, v in make_key().to_record().items() if k != "hash"}), "hash"),
])
def test_a_record_that_is_no_key_is_refused_saying_why(raw: str, reason: str) -> None:
    with pytest.raises(KeyRecordError, match=reason.replace("$", r"\$").replace("[", r"\[").replace("]", r"\]")):
        ApiKey.decode(raw)


def test_decode_keys_leaves_out_what_it_cannot_read(caplog: pytest.LogCaptureFixture) -> None:
    good = make_key("key_2")
    with caplog.at_level(logging.ERROR, logger="gateway"):
        decoded = decode_keys([("key_1", "{not json"), ("key_2", good.encode()), ("key_3", None)])
    assert decoded == [good]
    (error,) = [r.getMessage() for r in caplog.records]
    assert "key_1" in error and "opens nothing" in error
