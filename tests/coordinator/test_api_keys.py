"""API keys and tenant quotas on every front door of an in-process cluster started with
`--api-key`, `--api-keys FILE` and `--tenant-max-concurrent 1`: key-less and wrong-key
requests get 401 (gRPC UNAUTHENTICATED) in the protocol's shape, health/readiness/metrics stay
open, the key, not the client, names the tenant, and a tenant over its quota gets 429 while
another is served; `/metrics`, given `--metrics-key`, needs that key and no other. Plus the
flags themselves."""

from __future__ import annotations

import argparse
import json
import urllib.request

import grpc
import pytest

from coordinator.auth import ApiKeys, read_key_file
from disagg.config import CoordinatorConfig
from launcher.options import add_config_options, config_from_args, config_to_args
from launcher.serve import SECRET_FIELDS, secret_env
from tests.cluster_harness import wait_until
from tests.coordinator.front_door import get, grpc_stub, infer_request, post
from tests.inprocess_cluster import InProcessCluster

ALPHA = {"Authorization": "Bearer k-alpha"}
METRICS_KEY = "m-scrape"
SCRAPE = {"Authorization": f"Bearer {METRICS_KEY}"}


@pytest.fixture(scope="module")
def serve(tiny_model_dir, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# key tenant\nk-alpha alpha\nk-beta beta\n")
    options = dict(
        api_key=("k-plain",),
        api_keys=str(key_file),
        tenant_max_concurrent=1,
        metrics_key=METRICS_KEY,
    )
    with InProcessCluster(tiny_model_dir, **options) as cluster:
        yield cluster


def completion(serve, headers: dict[str, str], **fields: object) -> tuple[int, dict]:
    body = {"prompt": "Hi", "max_tokens": 1, **fields}
    status, reply, _ = post(f"{serve.url}/v1/completions", body, headers)
    return status, reply


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Basic k-alpha"},
        {"Authorization": "Bearer "},
    ],
)
def test_openai_without_a_valid_key_is_401_in_openais_shape(serve, headers):
    status, reply = completion(serve, headers)
    assert status == 401 and reply["error"]["code"] == "invalid_api_key", reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["message"]
    status, reply, response_headers = post(f"{serve.url}/v1/chat/completions", {}, headers)
    assert status == 401 and response_headers["www-authenticate"] == "Bearer"


def test_kserve_rest_without_a_key_is_401_in_kserves_shape(serve):
    url = f"{serve.url}/v2/models/{serve.model}/generate"
    status, reply, _ = post(url, {"text_input": "Hi", "parameters": {"max_tokens": 1}})
    assert status == 401 and list(reply) == ["error"] and isinstance(reply["error"], str)
    assert get(f"{serve.url}/v2") == 401
    status, reply, _ = post(url, {"text_input": "Hi", "parameters": {"max_tokens": 1}}, ALPHA)
    assert status == 200 and reply["token_count"] == 1


def test_health_readiness_and_openapi_stay_open(serve):
    model = serve.model
    for path in (
        "/health", "/cluster", "/openapi.json", "/v2/health/live", "/v2/health/ready",
        f"/v2/models/{model}/ready",
    ):  # fmt: skip
        assert get(serve.url + path) == 200, path


@pytest.mark.parametrize(
    "headers",
    [{}, ALPHA, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {METRICS_KEY}"}],
)
def test_metrics_need_the_metrics_key_not_an_api_key(serve, headers):
    status, reply, response_headers = post(f"{serve.url}/metrics", b"", headers)
    assert status == 401 and "metrics key" in reply["error"], reply
    assert response_headers["www-authenticate"] == "Bearer"
    assert get(f"{serve.url}/metrics", headers) == 401


def test_a_scrape_with_the_metrics_key_is_served(serve):
    request = urllib.request.Request(f"{serve.url}/metrics", headers=SCRAPE)
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200 and b"disagg_requests_running" in response.read()


def test_metrics_key_is_handed_to_children_in_the_environment():
    config = CoordinatorConfig(metrics_key="m")
    assert secret_env(config)["DISAGG_METRICS_KEY"] == "m"
    assert "m" not in config_to_args(config, SECRET_FIELDS)
    assert ApiKeys.from_config(CoordinatorConfig()).check_metrics(None) is None  # open


@pytest.mark.parametrize("key", ["k-plain", "k-alpha", "k-beta"])
def test_every_configured_key_is_served(serve, key):
    status, reply = completion(serve, {"Authorization": f"Bearer {key}"})
    assert status == 200 and reply["usage"]["completion_tokens"] == 1


def test_the_key_names_the_tenant_not_the_client(serve):
    headers = {**ALPHA, "X-Tenant-Id": "mallory"}
    assert completion(serve, headers, user="mallory")[0] == 200
    url = f"{serve.url}/v2/models/{serve.model}/generate"
    body = {"text_input": "Hi", "parameters": {"max_tokens": 1, "tenant_id": "mallory"}}
    assert post(url, body, headers)[0] == 200
    request = urllib.request.Request(f"{serve.url}/metrics", headers=SCRAPE)
    with urllib.request.urlopen(request) as response:
        metrics = response.read().decode()
    assert 'tenant="alpha"' in metrics and "mallory" not in metrics
    serve.wait_all_blocks_free()


def test_kserve_grpc_needs_the_key_in_metadata(serve):
    channel, stub = grpc_stub(serve.grpc_port)
    with channel:
        assert stub.ServerLive(_live_request(), timeout=10).live  # liveness stays open
        request = infer_request(serve.model)
        for metadata in ((), (("authorization", "Bearer nope"),)):
            with pytest.raises(grpc.RpcError) as failure:
                stub.ModelInfer(request, metadata=metadata, timeout=30)
            assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as failure:
            list(stub.ModelStreamInfer(iter([request]), timeout=30))
        assert failure.value.code() == grpc.StatusCode.UNAUTHENTICATED
        reply = stub.ModelInfer(request, metadata=(("authorization", "Bearer k-beta"),))
        assert reply.outputs[0].name == "text_output"
    serve.wait_all_blocks_free()


def _live_request():
    from tritonclient.grpc import service_pb2

    return service_pb2.ServerLiveRequest()


def test_api_key_flags_repeat_and_reach_a_child_process(monkeypatch):
    parser = argparse.ArgumentParser()
    add_config_options(parser, CoordinatorConfig)
    args = parser.parse_args(["--api-key", "a", "--api-key", "b", "--api-keys", "f.txt"])
    config = config_from_args(CoordinatorConfig, args)
    assert config.api_key == ("a", "b") and config.api_keys == "f.txt"
    words = config_to_args(config)
    assert words[words.index("--api-key") : words.index("--api-key") + 4] == [
        "--api-key", "a", "--api-key", "b",
    ]  # fmt: skip
    assert config_from_args(CoordinatorConfig, parser.parse_args([])).api_key == ()
    monkeypatch.setenv("DISAGG_API_KEY", "x,y")
    from_env = argparse.ArgumentParser()
    add_config_options(from_env, CoordinatorConfig)
    assert config_from_args(CoordinatorConfig, from_env.parse_args([])).api_key == ("x", "y")


def test_key_file_format(tmp_path):
    path = tmp_path / "keys"
    path.write_text("k1 team-a  # comment\n\nk2\n")
    assert read_key_file(path) == [("k1", "team-a"), ("k2", "default")]
    keys = ApiKeys.from_config(CoordinatorConfig(api_keys=str(path)))
    assert keys.tenant("Bearer k1") == "team-a" and keys.tenant("bearer k2") == "default"
    assert ApiKeys().tenant(None) is None  # keys off: nobody is asked
    path.write_text("k1 a b\n")
    with pytest.raises(ValueError, match="KEY"):
        read_key_file(path)


def test_a_tenant_over_its_concurrency_gets_429_while_another_is_served(serve):
    body = {"prompt": "Once", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(
        f"{serve.url}/v1/completions", json.dumps(body).encode(), ALPHA
    )
    with urllib.request.urlopen(request, timeout=60) as stream:
        assert stream.readline().startswith(b"data: ")  # alpha's one slot is taken
        status, reply, headers = post(f"{serve.url}/v1/completions", {"prompt": "Hi"}, ALPHA)
        assert status == 429 and reply["error"]["type"] == "rate_limit_exceeded", reply
        assert int(headers["retry-after"]) >= 1
        url = f"{serve.url}/v2/models/{serve.model}/generate"
        status, reply, _ = post(url, {"text_input": "Hi"}, ALPHA)
        assert status == 429 and isinstance(reply["error"], str)
        channel, stub = grpc_stub(serve.grpc_port)
        with channel, pytest.raises(grpc.RpcError) as failure:
            stub.ModelInfer(
                infer_request(serve.model), metadata=(("authorization", ALPHA["Authorization"]),)
            )
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert completion(serve, {"Authorization": "Bearer k-beta"})[0] == 200  # beta is served
    wait_until(lambda: completion(serve, ALPHA)[0] == 200, 30, "alpha's slot to come back")
    serve.wait_all_blocks_free()
