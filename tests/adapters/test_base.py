"""The passthrough adapter's reading of runtime error bodies, whatever their fields hold."""

from __future__ import annotations

import json

import pytest

from adapters.base import Adapter


@pytest.mark.parametrize(("param", "code", "expected"), [
    (5, 7, ("5", "7")),  # numbers become the strings the OpenAI format has
    (1.5, "bad", ("1.5", "bad")),
    ({"a": 1}, [1], (None, None)),  # objects and lists: nothing a client could branch on
    (True, False, (None, None)),
    ("temperature", 400, ("temperature", None)),  # an int code that is the HTTP status says nothing more
])
def test_param_and_code_are_nullable_strings(param: object, code: object, expected: tuple) -> None:
    err = Adapter().error(400, json.dumps({"error": {"message": "m", "type": "X", "param": param, "code": code}}).encode())
    assert (err.param, err.code) == expected
    assert (err.status, err.type) == (400, "invalid_request_error")


@pytest.mark.parametrize("kind", [{"a": 1}, ["server_error"], 5])
def test_an_error_type_that_is_not_a_string_comes_from_the_status(kind: object) -> None:
    err = Adapter().error(503, json.dumps({"error": {"message": "m", "type": kind}}).encode())
    assert (err.status, err.type) == (503, "server_error")


def test_an_int_code_in_a_stream_error_is_its_status() -> None:
    err = Adapter().error(None, b'{"error": {"message": "busy", "code": 503}}')
    assert (err.status, err.code) == (503, None)
    err = Adapter().error(None, b'{"error": {"message": "odd", "code": 7}}')
    assert (err.status, err.code) == (500, "7")
