"""The cluster's request lifecycle on the in-process cluster (tiny model): bad requests and a
hundred streams with random client cancellations leave every KV block free."""

from __future__ import annotations

import pytest

from tests.cluster import test_cluster as real


@pytest.fixture(scope="module")
def cluster(inprocess_cluster):
    return inprocess_cluster


@pytest.mark.parametrize(("body", "param"), real.BAD_REQUESTS)
def test_bad_requests_get_openai_errors_and_leak_nothing(cluster, body, param):
    real.test_bad_requests_get_openai_errors_and_leak_nothing(cluster, body, param)


@pytest.mark.slow  # several seconds: the full suite runs it
def test_a_hundred_requests_with_random_cancellations_leak_nothing(cluster):
    real.test_a_hundred_requests_with_random_cancellations_leak_nothing(cluster)


def test_a_request_its_first_token_finishes_frees_its_decode_handle_at_once(cluster):
    """max_tokens=1 ends at the prefill worker; the decode worker never sees a Decode, so the
    coordinator must free the handle itself, not leave it to the 30 s ready timeout."""
    for max_tokens in (2, None, 1, 1):
        status, reply = cluster.completion("Hi", max_tokens=max_tokens)
        assert status == 200, reply
        cluster.wait_all_blocks_free(timeout_s=5.0)
