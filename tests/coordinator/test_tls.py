"""TLS on the coordinator's front doors, with certificates made here by the `openssl` CLI: HTTPS
and KServe gRPC over TLS serve, plaintext on either port is refused, and with `--tls-ca` a gRPC
client without a certificate the CA signed is refused at the handshake."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from coordinator.tls import TlsFiles
from disagg.config import ConfigError, CoordinatorConfig
from tests.coordinator.front_door import infer_request
from tests.inprocess_cluster import InProcessCluster


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1/localhost and its key, as PEM files."""
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "1", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("tls")
    server_cert, server_key = self_signed(directory, "server")
    client_cert, client_key = self_signed(directory, "client")  # its own CA: self-signed
    stranger_cert, stranger_key = self_signed(directory, "stranger")
    return dict(
        server_cert=server_cert, server_key=server_key, client_cert=client_cert,
        client_key=client_key, stranger_cert=stranger_cert, stranger_key=stranger_key,
    )  # fmt: skip


@pytest.fixture(scope="module")
def serve(tiny_model_dir, certs):
    options = dict(
        tls_cert=str(certs["server_cert"]),
        tls_key=str(certs["server_key"]),
        tls_ca=str(certs["client_cert"]),
    )
    with InProcessCluster(tiny_model_dir, **options) as cluster:
        yield cluster


def test_https_serves_completions(serve):
    body = json.dumps({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()
    request = urllib.request.Request(
        f"{serve.url}/v1/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60, context=serve.ssl_context) as response:
        assert response.status == 200
        assert json.load(response)["usage"]["completion_tokens"] == 2
    serve.wait_all_blocks_free()


def test_plaintext_http_is_refused(serve):
    connection = http.client.HTTPConnection("127.0.0.1", serve.http_port, timeout=10)
    with pytest.raises((OSError, http.client.HTTPException)):
        connection.request("GET", "/health")
        connection.getresponse()
    connection.close()


def test_https_with_an_untrusted_certificate_is_refused_by_the_client(serve):
    context = ssl.create_default_context()  # the system's CAs: our self-signed cert is unknown
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"{serve.url}/health", timeout=10, context=context)


def grpc_infer(
    serve, credentials: grpc.ChannelCredentials | None
) -> service_pb2.ModelInferResponse:
    address = f"127.0.0.1:{serve.grpc_port}"
    channel = (
        grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    )
    with channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return stub.ModelInfer(infer_request(serve.model), timeout=30)


def client_credentials(certs: dict[str, Path], name: str) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=certs["server_cert"].read_bytes(),
        private_key=certs[f"{name}_key"].read_bytes(),
        certificate_chain=certs[f"{name}_cert"].read_bytes(),
    )


def test_grpc_over_mutual_tls_serves(serve, certs):
    reply = grpc_infer(serve, client_credentials(certs, "client"))
    assert reply.outputs[0].name == "text_output"
    serve.wait_all_blocks_free()


@pytest.mark.parametrize("client", ["plaintext", "no certificate", "stranger"])
def test_grpc_without_tls_or_a_trusted_client_certificate_is_refused(serve, certs, client):
    credentials = {
        "plaintext": None,
        "no certificate": grpc.ssl_channel_credentials(certs["server_cert"].read_bytes()),
        "stranger": client_credentials(certs, "stranger"),
    }[client]
    with pytest.raises(grpc.RpcError) as refused:
        grpc_infer(serve, credentials)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    serve.wait_all_blocks_free(timeout_s=5)


def test_tls_settings_are_checked_at_start_up(tmp_path):
    with pytest.raises(ConfigError, match="tls_key"):
        CoordinatorConfig(tls_cert="cert.pem")
    with pytest.raises(ConfigError, match="tls_ca"):
        CoordinatorConfig(tls_ca="ca.pem")
    missing = CoordinatorConfig(tls_cert=str(tmp_path / "no.pem"), tls_key=str(tmp_path / "k"))
    with pytest.raises(ConfigError, match="tls_cert: cannot read"):
        TlsFiles.from_config(missing)
    assert TlsFiles.from_config(CoordinatorConfig()) is None


def test_disagg_serve_probes_a_tls_coordinator_over_https(serve):
    from launcher.serve import registered_worker_ids

    assert sorted(registered_worker_ids(f"{serve.url}/cluster")) == ["decode-0", "prefill-0"]
