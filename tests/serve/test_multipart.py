"""serve/multipart.py against the ``email`` package's reading of the same bodies."""

from __future__ import annotations

import base64
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import collapse_rfc2231_value

import pytest
import requests

from serve.inputs import ApiError, parse_multipart_request
from serve.multipart import boundary_of, split_form_data


def email_reading(body: bytes, content_type: str) -> list[tuple[str | None, bytes]]:
    """What the service's parser did before: the whole body through ``email.parser.BytesParser``."""
    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    assert msg.is_multipart() and not msg.defects
    out = []
    for part in msg.iter_parts():
        param = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        out.append((collapse_rfc2231_value(param) if isinstance(param, tuple) else param,
                    payload if isinstance(payload, bytes) else b""))
    return out


def _prepared(files, data) -> tuple[bytes, str]:
    req = requests.Request("POST", "http://127.0.0.1/", files=files, data=data).prepare()
    assert isinstance(req.body, bytes)
    return req.body, req.headers["Content-Type"]


BINARY = bytes(range(256)) * 3 + b"\r\n\r\n--not-the-boundary\r\n" + b"\r\n"


def _hand_made() -> list[tuple[bytes, str]]:
    b = "frontier"
    padded = (b"preamble text\r\n--frontier \t\r\n"  # transport padding after a delimiter
              b'Content-Disposition: form-data; name="labels"\r\n\r\n0,1\r\n'
              b"--frontier\r\n"
              b'Content-Disposition: form-data; name*=utf-8\'\'imag%65s; filename="a.png"\r\n'
              b"Content-Type: image/png\r\n\r\n" + BINARY + b"\r\n"
              b"--frontier\r\n"
              b"Content-Disposition: form-data;\r\n name=\"k\"\r\n\r\n3\r\n"  # a folded header line
              b"--frontier\r\n"
              b'Content-Disposition: form-data; name="images"\r\n'
              b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(b"\x89PNG..") + b"\r\n"
              b"--frontier\r\n\r\nno headers at all\r\n"
              b"--frontier--\r\nepilogue")
    return [(padded, f'multipart/form-data; boundary="{b}"')]


@pytest.mark.parametrize("case", range(4))
def test_parts_are_read_as_the_email_package_reads_them(case):
    bodies = [
        _prepared([("images", ("a.png", BINARY, "image/png")), ("images", ("b.png", b"", "image/png"))],
                  {"labels": ["0", "1"], "k": "3"}),
        _prepared([("images", (f"{i}.png", bytes([i]) * (i + 1), "image/png")) for i in range(50)], {"labels": "0,1"}),
        _prepared([("files", ('we"ird \\name*.png', b"x\r\n", "application/octet-stream"))], {}),
        *_hand_made(),
    ]
    body, content_type = bodies[case]
    assert split_form_data(body, content_type) == email_reading(body, content_type)


def test_the_hand_made_body_gives_every_part():
    (body, content_type), = _hand_made()
    assert split_form_data(body, content_type) == [
        ("labels", b"0,1"), ("images", BINARY), ("k", b"3"), ("images", b"\x89PNG.."), (None, b"no headers at all")]


@pytest.mark.parametrize(("body", "content_type", "message"), [
    (b"--b\r\n\r\nx\r\n--b--", "multipart/form-data", "without a boundary"),
    (b"--b\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=\"\"", "without a boundary"),
    (b"no delimiter here", "multipart/form-data; boundary=b", "no part starts"),
    (b"--b\r\n\r\nx\r\n--b\r\n\r\ny", "multipart/form-data; boundary=b", "no closing boundary"),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\nx", "multipart/form-data; boundary=b", "empty line"),
    (b"--bx\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", "text after a boundary"),
    (b"--b--\r\n--b\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b", "after the closing"),
])
def test_malformed_bodies_are_one_line_errors(body, content_type, message):
    with pytest.raises(ValueError, match=message):
        split_form_data(body, content_type)
    with pytest.raises(ApiError) as err:
        parse_multipart_request(body, content_type)
    assert err.value.status == 400 and "\n" not in err.value.message


def test_boundary_of_reads_quoted_and_plain_boundaries():
    assert boundary_of('multipart/form-data; boundary="a b:c"') == b"a b:c"
    assert boundary_of("multipart/form-data; charset=utf-8; boundary=xyz") == b"xyz"
