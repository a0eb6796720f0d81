"""`disagg-bench disagg-policy`: the mixed workload is what it says, and each policy's server is
the same cluster but for the flag."""

from __future__ import annotations

import argparse

from bench import disagg_policy
from bench.cli import build_parser, main
from bench.serving import commands
from bench.serving.record import RequestRecord
from bench.serving.runner import RunPlan, Target, TargetResult
from bench.serving.schedule import Schedule
from bench.serving.slo import parse_slo


def parsed(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["disagg-policy", *argv])


def test_the_mix_has_short_long_and_shared_prefix_prompts(tokenizer, tmp_path):
    args = parsed("--num-requests", "10", "--warmup", "2", "-o", str(tmp_path))
    plan, _ = commands.build_plan(disagg_policy.run_args(args, tmp_path))
    workload = disagg_policy.mixed_workload(args, len(plan.workload))
    assert [r.index for r in workload] == list(range(12))
    lengths = sorted(r.input_len for r in workload)
    assert lengths[0] <= 48 and lengths[-1] >= 256 + 16
    prefixed = [r for r in workload if r.input_len >= 256 + 16 and r.input_len <= 256 + 48 + 2]
    heads = {r.prompt[:200] for r in prefixed}
    assert len(prefixed) > len(heads), "some prompts share a prefix"
    assert workload == disagg_policy.mixed_workload(args, len(plan.workload))  # seeded


def test_each_policy_runs_the_same_cluster_but_for_its_flag():
    args = parsed()
    commands_by_policy = {p: disagg_policy.server(args, p).args for p in disagg_policy.POLICIES}
    for policy, argv in commands_by_policy.items():
        assert argv[argv.index("--disagg-policy") + 1] == policy
        assert argv[argv.index("--dtype") + 1] == "float32"
    always, auto = commands_by_policy["always"], commands_by_policy["auto"]
    assert len(always) == len(auto) and "--in-place-stall-weight" not in auto
    tuned = disagg_policy.server(parsed("--in-place-stall-weight", "0.5"), "auto").args
    assert tuned[tuned.index("--in-place-stall-weight") + 1] == "0.5"


def test_unknown_policies_are_refused(capsys):
    assert main(["disagg-policy", "--policies", "sometimes"]) == 2
    assert "unknown" in capsys.readouterr().err


def record(index: int, ttft_ms: int) -> RequestRecord:
    ms = 1_000_000
    return RequestRecord(
        index, 10, 2, sent_ns=0, chunk_ns=[ttft_ms * ms, (ttft_ms + 50) * ms],
        chunk_tokens=[1, 1], end_ns=(ttft_ms + 50) * ms, status=200, completion_tokens=2,
    )  # fmt: skip


def test_a_policys_turns_are_combined_as_passes_and_its_placements_summed():
    slo = parse_slo("ttft<=1s")
    plan = RunPlan((), Schedule((0.0,), None, None), None, slo=slo)
    turns = [
        TargetResult(Target("auto", "http://127.0.0.1:1"), [record(0, 100)], {}, 0.0, [], {}),
        TargetResult(Target("auto", "http://127.0.0.1:1"), [record(0, 3000)], {}, 0.0, [], {}),
    ]
    for turn, where in zip(turns, ("in_place", "remote")):
        key = f'disagg_prefill_placements_total{{model="m",placement="{where}",reason="cost"}}'
        turn.server_metrics = {key: 1.0}
    both = disagg_policy.combined(turns, plan)
    assert [r.repeat for r in both.records] == [0, 1]
    assert both.summary["num_requests"] == 2 and both.summary["slo_attainment"] == 0.5
    assert disagg_policy.placements(turns) == {"in_place": 1.0, "remote": 1.0}
