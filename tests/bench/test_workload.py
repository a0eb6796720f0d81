from __future__ import annotations

import numpy as np
import pytest

from bench.serving.lengths import parse_length
from bench.serving.workload import SyntheticConfig, build_synthetic, count_tokens, write_workload


def test_length_specs_sample_their_distributions():
    rng = np.random.default_rng(0)
    assert parse_length("fixed:7").sample(rng, 3) == [7, 7, 7]
    uniform = parse_length("uniform:10:20").sample(rng, 5000)
    assert min(uniform) == 10 and max(uniform) == 20
    normal = np.array(parse_length("normal:100:10").sample(rng, 5000))
    assert normal.mean() == pytest.approx(100, abs=1) and normal.std() == pytest.approx(10, rel=0.1)
    lognormal = np.array(parse_length("lognormal:200:0.5").sample(rng, 5000))
    assert np.median(lognormal) == pytest.approx(200, rel=0.05)
    assert min(parse_length("normal:2:50").sample(rng, 1000)) >= 1


@pytest.mark.parametrize("text", ["fixed", "fixed:0", "uniform:5:2", "normal:1", "zipf:3"])
def test_bad_lengths_are_refused(text):
    with pytest.raises(ValueError):
        parse_length(text)


def test_prompts_retokenize_to_exactly_the_requested_length(tokenizer):
    config = SyntheticConfig(parse_length("uniform:1:400"), parse_length("fixed:8"), 150, seed=3)
    workload = build_synthetic(config, tokenizer)
    assert [count_tokens(tokenizer, r.prompt) for r in workload] == [r.input_len for r in workload]
    assert len({r.prompt for r in workload}) == len(workload)  # nothing shared by accident


def test_same_seed_gives_byte_identical_workload(tokenizer, tmp_path):
    config = SyntheticConfig(parse_length("lognormal:64:0.7"), parse_length("uniform:4:32"), 40, 11)
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"]
    write_workload(paths[0], build_synthetic(config, tokenizer))
    write_workload(paths[1], build_synthetic(config, tokenizer))
    other = SyntheticConfig(config.input_len, config.output_len, 40, 12)
    write_workload(paths[2], build_synthetic(other, tokenizer))
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert paths[0].read_bytes() != paths[2].read_bytes()
