from __future__ import annotations

import orjson
import pytest

from er_gateway.errors import GatewayError, parse_backend_error


@pytest.mark.parametrize(
    "body,message,param",
    [
        (b'{"object":"error","message":"too long","type":"BadRequestError","param":null,"code":400}', "too long", None),
        (b'{"error":{"message":"nope","type":"NotFoundError","param":"model","code":404}}', "nope", "model"),
        (b'{"detail":"Not Found"}', "Not Found", None),
        (b'{"detail":[{"loc":["body","input"],"msg":"field required"}]}', "input: field required", "input"),
        (b"<html>bad gateway</html>", "<html>bad gateway</html>", None),
        (b"", "empty response", None),
    ],
)
def test_parse_backend_error_shapes(body: bytes, message: str, param: str | None) -> None:
    assert parse_backend_error(body) == (message, param)


def test_envelope() -> None:
    r = GatewayError(429, "slow down", headers={"Retry-After": "3"}).response()
    assert r.status_code == 429 and r.headers["Retry-After"] == "3"
    assert orjson.loads(r.body) == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": 429}
    }
