"""The running-batch sampler reads decode workers from /cluster, and stays silent elsewhere."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.serving.decode_batch_sampler import DecodeBatchSampler, decode_running
from tests.cluster_harness import wait_until


class FakeCluster(BaseHTTPRequestHandler):
    running = [3, 5]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path != "/cluster":
            self.send_error(404)
            return
        workers = [{"role": "prefill", "num_running_sequences": 0}] + [
            {"role": "decode", "num_running_sequences": n} for n in self.running
        ]
        body = json.dumps({"ready": True, "workers": workers}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def fake_cluster():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeCluster)  # a free port
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_sums_the_decode_workers_running_batches(fake_cluster):
    assert decode_running(fake_cluster) == 8
    with DecodeBatchSampler(fake_cluster, interval_s=0.01) as sampler:
        wait_until(lambda: len(sampler.samples) >= 3, 10, "three samples")
    summary = sampler.summary()
    assert summary["max"] == summary["median"] == 8 and summary["num_samples"] >= 3


def test_a_server_without_cluster_gives_no_summary(loopback):
    assert decode_running(loopback.url()) is None
    with DecodeBatchSampler(loopback.url(), interval_s=0.01) as sampler:
        pass
    assert sampler.summary() is None
