"""RFC 7523 client authentication (auth_method: private_key_jwt): the assertion each token
request carries, verified here with the public key as an IdP would, and the keys refused at
load time with the key path named."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from ext_authz.client_assertion import ASSERTION_TYPE, KeyProblem, client_assertion, signing_key
from ext_authz.errors import ConfigError
from ext_authz.policy.config import load_config
from ext_authz.token_requests import build_token_request

TOKEN_URL = "https://idp.example/oauth2/token"


def pem(key: Any, password: bytes | None = None) -> str:
    encryption = (serialization.BestAvailableEncryption(password) if password
                  else serialization.NoEncryption())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption).decode()


def parts(assertion: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    def decode(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    head, body, signature = assertion.split(".")
    return (json.loads(decode(head)), json.loads(decode(body)), decode(signature),
            f"{head}.{body}".encode())


RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC = ec.generate_private_key(ec.SECP256R1())


@pytest.mark.parametrize(("key", "alg"), [(RSA, "RS256"), (EC, "ES256")])
def test_an_assertion_the_idp_can_verify(key: Any, alg: str) -> None:
    assertion = client_assertion(pem(key), "gateway", TOKEN_URL, "key-1", now=1_800_000_000)
    header, claims, signature, signed = parts(assertion)
    assert header == {"alg": alg, "typ": "JWT", "kid": "key-1"}
    assert claims.pop("jti")
    assert claims == {"iss": "gateway", "sub": "gateway", "aud": TOKEN_URL,
                      "iat": 1_800_000_000, "exp": 1_800_000_060}
    verify(key, alg, signature, signed)
    with pytest.raises(InvalidSignature):  # the check itself can fail
        verify(key, alg, signature, signed + b"x")


def verify(key: Any, alg: str, signature: bytes, signed: bytes) -> None:
    """Check a JWS signature as an IdP would (ES256's is r and s, not DER)."""
    public = key.public_key()
    if alg == "RS256":
        public.verify(signature, signed, padding.PKCS1v15(), hashes.SHA256())
        return
    der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                               int.from_bytes(signature[32:], "big"))
    public.verify(der, signed, ec.ECDSA(hashes.SHA256()))


def test_every_assertion_is_fresh() -> None:
    key = pem(EC)
    first, second = (parts(client_assertion(key, "gateway", TOKEN_URL, None))[1]
                     for _ in range(2))
    assert first["jti"] != second["jti"]


@pytest.mark.parametrize(("key", "problem"), [
    (pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)),
     "an RSA key of 1024 bits; give at least 2048"),
    (pem(ec.generate_private_key(ec.SECP384R1())), "neither an RSA key nor an EC P-256 key"),
    (pem(ed25519.Ed25519PrivateKey.generate()), "neither an RSA key nor an EC P-256 key"),
    (pem(EC, password=b"pass"), "not an unencrypted PEM private key"),
    ("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
     "not an unencrypted PEM private key"),
])
def test_keys_that_cannot_sign_are_refused(key: str, problem: str) -> None:
    with pytest.raises(KeyProblem, match=problem):
        signing_key(key)


def config_file(tmp_path: Path, key_text: str) -> Path:
    key = tmp_path / "gateway.pem"
    key.write_text(key_text)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps({"servers": {"crm": {"oauth2": {
        "token_url": TOKEN_URL, "client_id": "gateway", "auth_method": "private_key_jwt",
        "private_key_file": str(key), "key_id": "k1"}}}}))
    return path


def test_the_key_is_read_at_load_and_signs_the_token_request(tmp_path: Path) -> None:
    config = load_config(config_file(tmp_path, pem(EC)))
    settings = config.servers["crm"].oauth2
    assert settings is not None
    assert tmp_path / "gateway.pem" in config.watched_files()
    form, headers = build_token_request(settings)
    assert "authorization" not in headers  # no secret, no Basic
    assert form["client_id"] == "gateway"
    assert form["client_assertion_type"] == ASSERTION_TYPE
    header, claims, _, _ = parts(form["client_assertion"])
    assert (header["kid"], claims["aud"]) == ("k1", TOKEN_URL)
    assert "PRIVATE KEY" not in repr(config)
    assert "PRIVATE KEY" not in config.model_dump_json()


def test_a_key_that_cannot_sign_is_refused_at_load_naming_the_key(tmp_path: Path) -> None:
    small = pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    with pytest.raises(ConfigError, match=r"servers\.crm\.oauth2\.private_key_file: .*an RSA"
                                          r" key of 1024 bits"):
        load_config(config_file(tmp_path, small))


def test_a_rotated_key_is_a_new_credential(tmp_path: Path) -> None:
    one = load_config(config_file(tmp_path, pem(EC))).servers["crm"].oauth2
    two = load_config(config_file(tmp_path, pem(ec.generate_private_key(ec.SECP256R1())))
                      ).servers["crm"].oauth2
    assert one is not None
    assert two is not None
    assert one.cache_key != two.cache_key
    assert pem(EC) not in "".join(one.cache_key)
