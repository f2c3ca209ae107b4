"""The schemas-level helpers shared by pipeline and sapiensid: --set parsing, device resolution, and the
execution-field marker of the build config."""

from __future__ import annotations

import pytest

from pipeline.config import BuildConfig, hashed_dump, is_execution
from schemas.devices import DeviceError, gpu_count, resolve_device
from schemas.overrides import OverrideError, parse_overrides, set_dotted


def test_parse_overrides_types_and_errors():
    got = parse_overrides(["run.executor=local", "persons.batch_size=8", "x.f=0.5", "x.b=true", "x.n=null",
                           "x.l=[1, 2]", 'x.j={"a": 1}', "x.e=", "x.p=a=b", "x.bad=[1"])
    assert got == {"run.executor": "local", "persons.batch_size": 8, "x.f": 0.5, "x.b": True, "x.n": None,
                   "x.l": [1, 2], "x.j": {"a": 1}, "x.e": "", "x.p": "a=b", "x.bad": "[1"}
    for bad in ["novalue", "=1", "a..b=1", ".a=1"]:
        with pytest.raises(OverrideError, match="key=value"):
            parse_overrides([bad])
    d: dict = {"a": 1}
    set_dotted(d, "b.c", 2)
    assert d == {"a": 1, "b": {"c": 2}}
    with pytest.raises(OverrideError, match="holds a value"):
        set_dotted(d, "a.x", 3)


def test_resolve_device():
    assert resolve_device("CPU") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if gpu_count() else "cpu")
    with pytest.raises(DeviceError, match="persons.device 'tpu' not understood"):
        resolve_device("tpu", "persons.device")
    with pytest.raises(DeviceError, match="not understood"):
        resolve_device("cuda:x")
    if not gpu_count():
        for name in ("cuda", "cuda:1", "0"):
            with pytest.raises(DeviceError, match="no CUDA GPU"):
                resolve_device(name, "faces.device")


def test_execution_fields_leave_the_hash_by_construction():
    cfg = BuildConfig()
    before = hashed_dump(cfg)
    cfg.persons.batch_size = 3
    cfg.persons.threads = 2
    cfg.faces.num_threads = 4
    cfg.download.thread_count = 7
    cfg.run.executor = "local"
    assert hashed_dump(cfg) == before
    assert hashed_dump(cfg)["run"] == {}  # the run section is execution only
    cfg.persons.conf_threshold = 0.5  # a setting that changes the output does enter it
    assert hashed_dump(cfg) != before
    assert is_execution(type(cfg.persons), "batch_size") and not is_execution(type(cfg.persons), "imgsz")
