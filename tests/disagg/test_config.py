"""Every component's settings: defaults, one docstring per field, errors that name the field."""

from __future__ import annotations

import dataclasses

import pytest

from disagg import config
from launcher.options import field_docs

CONFIGS = [
    config.SchedulerConfig,
    config.EngineConfig,
    config.WorkerConfig,
    config.DecodeWorkerConfig,
    config.DispatchConfig,
    config.CoordinatorConfig,
    config.ServeConfig,
]


@pytest.mark.parametrize("cls", CONFIGS)
def test_every_field_has_a_default_and_a_one_line_doc(cls):
    cls()  # the defaults are valid
    docs = field_docs(cls)
    for field in dataclasses.fields(cls):
        assert field.default is not dataclasses.MISSING, f"{cls.__name__}.{field.name}"
        assert docs.get(field.name), f"{cls.__name__}.{field.name} has no docstring"
        assert "\n" not in docs[field.name], f"{cls.__name__}.{field.name}: one line"


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (config.EngineConfig, "block_size", 0),
        (config.EngineConfig, "num_kv_blocks", 0),
        (config.EngineConfig, "max_num_seqs", 0),
        (config.WorkerConfig, "coordinator", "nohost"),
        (config.WorkerConfig, "port", 70000),
        (config.DecodeWorkerConfig, "kv_transport", "udp"),
        (config.DecodeWorkerConfig, "ready_timeout_s", 0),
        (config.DispatchConfig, "prefill_timeout_s", -1),
        (config.CoordinatorConfig, "heartbeat_timeout_s", 0.5),
        (config.CoordinatorConfig, "http_port", 0),
        (config.ServeConfig, "num_decode_workers", 0),
        (config.ServeConfig, "mode", "mixed"),
    ],
)
def test_a_bad_value_is_refused_naming_its_field(cls, field, value):
    with pytest.raises(config.ConfigError) as error:
        cls(**{field: value})
    assert error.value.field == field and field in str(error.value)


def test_colocated_serving_needs_no_prefill_worker():
    assert config.ServeConfig(mode="colocated", num_prefill_workers=0).num_prefill_workers == 0
    with pytest.raises(config.ConfigError):
        config.ServeConfig(num_prefill_workers=0)
