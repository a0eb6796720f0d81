"""Client deadlines through the real front doors (in-process cluster, tiny model): a request
still generating when its client's timeout passes is ended with the protocol's timeout status,
and every KV block is free again afterwards."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from coordinator.client_deadline import OPENAI_TIMEOUT_HEADER

TIMEOUT_S = 0.5
LONG = {"max_tokens": 3000, "ignore_eos": True, "temperature": 0}
"""Thousands of tokens: far longer than TIMEOUT_S, even for the tiny model."""


def post_with_timeout_header(url: str, body: dict) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", OPENAI_TIMEOUT_HEADER: str(TIMEOUT_S)}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # NOTE: we wait longer
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_an_openai_request_past_the_sdks_timeout_is_a_504_and_frees_its_blocks(
    inprocess_cluster,
):
    started_s = time.monotonic()
    status, body = post_with_timeout_header(
        f"{inprocess_cluster.url}/v1/completions",
        {"model": inprocess_cluster.model, "prompt": "Once upon a time", **LONG},
    )
    assert status == 504 and body["error"]["type"] == "timeout"
    assert time.monotonic() - started_s < TIMEOUT_S + 5.0
    inprocess_cluster.wait_all_blocks_free(timeout_s=10)


def test_a_kserve_grpc_call_past_its_deadline_ends_and_frees_its_blocks(inprocess_cluster):
    client = triton.InferenceServerClient(f"127.0.0.1:{inprocess_cluster.grpc_port}")
    tensor = triton.InferInput("text_input", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"Once upon a time"], dtype=object))
    try:
        with pytest.raises(InferenceServerException) as late:
            client.infer(
                inprocess_cluster.model, [tensor], parameters=LONG, client_timeout=TIMEOUT_S
            )
        assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    finally:
        client.close()
    inprocess_cluster.wait_all_blocks_free(timeout_s=10)
