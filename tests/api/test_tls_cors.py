"""HTTPS (--ssl-certfile/--ssl-keyfile) and CORS (--allowed-origin): a browser page on an allowed origin may call
the API, keys and all; others get no CORS headers; TLS files that cannot serve are refused before the model
loads."""

from __future__ import annotations

import ssl

import httpx
import pytest
import trustme
from openai import OpenAI

from glm_serve.api import ServerSettings
from glm_serve.api.serve import check_tls
from glm_serve.cli import main

from .conftest import KEY_A, start_server

USER = [{"role": "user", "content": "hi"}]
PAGE = "https://chat.example.org"


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    d = tmp_path_factory.mktemp("tls")
    paths = {"ca": d / "ca.pem", "cert": d / "cert.pem", "key": d / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["cert"]), append=True)
    other = trustme.CA().issue_cert("127.0.0.1")  # a key that is not the certificate's
    paths["other_key"] = d / "other.pem"
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    return paths


def test_https_round_trip_with_the_openai_sdk(engine, tls):
    srv, server, thread = start_server(engine, ServerSettings(served_model_names=["glm-4-plus"]),
                                       ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"]))
    try:
        assert srv.url.startswith("https://")
        client = OpenAI(api_key="x", base_url=srv.url + "/v1", max_retries=0,
                        http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(tls["ca"]))))
        out = client.chat.completions.create(model="glm-4-plus", messages=USER, max_tokens=3, temperature=0)
        assert out.usage.completion_tokens >= 1
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port gets nothing it can read
            httpx.get(srv.url.replace("https://", "http://") + "/health", timeout=5)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_tls_flags_are_checked_before_the_model_loads(tls, tmp_path, capsys):
    check_tls(None, None)
    check_tls(str(tls["cert"]), str(tls["key"]))
    cases = [
        (["--ssl-certfile", str(tls["cert"])], "go together"),
        (["--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tmp_path / "nope.pem")], "no such file"),
        (["--ssl-certfile", str(tls["cert"]), "--ssl-keyfile", str(tls["other_key"])], "TLS"),
        (["--ssl-certfile", str(tls["key"]), "--ssl-keyfile", str(tls["key"])], "TLS"),  # a key is no certificate
    ]
    for flags, says in cases:
        # (a model that does not exist: had the flags passed, its error would be the one printed)
        argv = ["serve", "--model", str(tmp_path / "missing"), "--data-dir", str(tmp_path / "d"), *flags]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert says in err and "missing" not in err, err


def test_encrypted_key_is_refused_not_prompted_for(tls, tmp_path):
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415 (trustme's own dependency)

    key = serialization.load_pem_private_key(tls["key"].read_bytes(), password=None)
    locked = tmp_path / "locked.pem"
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"pass")))
    with pytest.raises(ValueError, match="encrypted"):
        check_tls(str(tls["cert"]), str(locked))


@pytest.fixture(scope="module")
def cors(make_server):
    return make_server(api_keys=[KEY_A], allowed_origins=[PAGE])


def _preflight(url, origin):
    return httpx.options(url, headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                       "Access-Control-Request-Headers": "authorization, content-type"})


def test_cors_lets_an_allowed_page_call_with_its_key(cors):
    url = cors.url + "/v1/chat/completions"
    r = _preflight(url, PAGE)  # a browser sends it without the key: it must pass anyway
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == PAGE
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    body = {"model": "glm-4-plus", "messages": USER, "max_tokens": 2}
    ok = httpx.post(url, json=body, headers={"Origin": PAGE, "Authorization": f"Bearer {KEY_A}"})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == PAGE
    # An error the page must be able to read (not an opaque network failure): the API's body, with CORS headers.
    denied = httpx.post(url, json=body, headers={"Origin": PAGE})
    assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == PAGE
    assert denied.json()["error"]["type"] == "authentication_error"
    # A stream too
    with httpx.stream("POST", url, json={**body, "stream": True},
                      headers={"Origin": PAGE, "Authorization": f"Bearer {KEY_A}"}) as s:
        assert s.headers["access-control-allow-origin"] == PAGE
        assert "data: [DONE]" in s.read().decode()


def test_cors_refuses_other_pages(cors, server):
    url = cors.url + "/v1/chat/completions"
    r = _preflight(url, "https://evil.example.org")
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
    r = httpx.get(cors.url + "/v1/models", headers={"Origin": "https://evil.example.org",
                                                     "Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    # Without --allowed-origin, no CORS at all: a preflight is not answered as one
    r = _preflight(server.url + "/v1/chat/completions", PAGE)
    assert "access-control-allow-origin" not in r.headers and r.status_code in (404, 405)


def test_allowed_origin_must_be_an_origin():
    for good in (["*"], [PAGE, "http://localhost:3000", "http://[::1]:8080"]):
        ServerSettings(allowed_origins=good)
    for bad in ("https://chat.example.org/", "chat.example.org", "https://chat.example.org/app", "ftp://x",
                "http://localhost:port", ""):
        with pytest.raises(ValueError, match="not an origin"):
            ServerSettings(allowed_origins=[bad])


def test_chat_cli_trusts_a_private_ca_through_ssl_cert_file(engine, tls, monkeypatch):
    # README (--ssl-certfile row): `glm-serve chat --url https://...` with SSL_CERT_FILE=ca.pem
    from glm_serve.chat_cli import server_backend  # noqa: PLC0415

    srv, server, thread = start_server(engine, ServerSettings(served_model_names=["glm-4-plus"]),
                                       ssl_certfile=str(tls["cert"]), ssl_keyfile=str(tls["key"]))
    try:
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
        with pytest.raises(ValueError, match="cannot reach"):  # the private CA is not trusted by default
            server_backend(srv.url, None, None, 0.0, 3)
        monkeypatch.setenv("SSL_CERT_FILE", str(tls["ca"]))
        assert "".join(server_backend(srv.url, None, None, 0.0, 3)(USER))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
