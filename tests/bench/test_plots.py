"""Plots are written by run, sweep and search, and re-rendered by `report` from records alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.cli import main
from bench.serving.plots import itl_by_position
from bench.serving.record import RequestRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RUN_PLOTS = ("ttft_cdf.png", "itl_cdf.png", "itl_by_position.png")
CURVE_PLOTS = ("throughput_vs_rate.png", "latency_vs_rate.png", "attainment_vs_rate.png")


def assert_pngs(directory: Path, names: tuple[str, ...]) -> None:
    for name in names:
        data = (directory / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 1000, name


def test_multi_token_chunks_spread_over_positions():
    record = RequestRecord(0, 4, 5, chunk_ns=[0, 6_000_000, 8_000_000], chunk_tokens=[1, 3, 1])
    assert dict(itl_by_position([record])) == {1: [2.0], 2: [2.0], 3: [2.0], 4: [2.0]}


@pytest.mark.slow  # several seconds: the full suite runs it
def test_run_writes_plots_and_report_rerenders_them(tmp_path, loopback):
    argv = ["run", "--target", f"a={loopback.url('chunk2')}", "--target", f"b={loopback.url('ok')}"]
    argv += ["--input-len", "fixed:12", "--output-len", "fixed:6", "--num-requests", "8"]
    assert (
        main([*argv, "--load", "poisson:50", "--slo", "ttft<=1s,tpot<=50ms", "-o", str(tmp_path)])
        == 0
    )
    assert_pngs(tmp_path, RUN_PLOTS)
    for name in RUN_PLOTS:
        (tmp_path / name).unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert_pngs(tmp_path, RUN_PLOTS)


@pytest.mark.slow  # several seconds: the full suite runs it
def test_sweep_writes_curve_plots_and_report_rerenders_them(tmp_path, loopback, capsys):
    argv = ["sweep", "--target", f"a={loopback.url('ok')}", "--input-len", "fixed:8"]
    argv += ["--output-len", "fixed:3", "--num-requests", "6", "--rates", "30,60"]
    assert main([*argv, "--slo", "ttft<=1s", "-o", str(tmp_path)]) == 0
    assert_pngs(tmp_path, CURVE_PLOTS)
    first_table = capsys.readouterr().out
    for name in CURVE_PLOTS:
        (tmp_path / name).unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert_pngs(tmp_path, CURVE_PLOTS)
    assert capsys.readouterr().out.strip() == first_table.strip()  # same numbers from records
