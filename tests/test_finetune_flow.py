"""The `webbody-finetune` Prefect flow runs, through `webbody finetune CONFIG` (no `--no-prefect`), on the shipped
configs/finetune_synthetic.yaml at a tiny size.

Prefect runs the flow against its ephemeral API server (no `prefect server` of our own), which the flow call
starts in a subprocess with a fresh database. On this shared 2-core machine at load ~12 that start-up alone took
~170 s of the 180 s allowed (`pipeline.runtime.ensure_offline_env`), so the test is opt-in:
``WEBBODY_PREFECT_FLOW_TESTS=1``. The same steps without the Prefect engine run in CI
(tests/test_finetune.py::test_cli_finetune_no_prefect).
"""

from __future__ import annotations

import json
import os

import pytest

from sapiensid.finetune.synthetic import write_multidomain
from tests.test_finetune import synthetic_config_args

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("WEBBODY_PREFECT_FLOW_TESTS") != "1",
                       reason="opt-in (WEBBODY_PREFECT_FLOW_TESTS=1): starts Prefect's ephemeral API server"),
]


@pytest.mark.timeout(900)
def test_finetune_flow_through_the_cli(tmp_path, capsys):
    from flows.cli import main

    write_multidomain(tmp_path / "train", range(10, 14), 2, ("vis", "ir"), size=48)
    write_multidomain(tmp_path / "test", range(40, 43), 2, ("vis", "ir"), size=48, image_seed=1)
    assert main(synthetic_config_args(tmp_path / "train", tmp_path / "test", tmp_path / "run")) == 0
    printed = capsys.readouterr().out
    assert "finetuned:" in printed and "base:" in printed  # the flow's report paths
    rep = json.loads((tmp_path / "run" / "eval" / "finetuned" / "finetune_eval.json").read_text())
    assert set(rep["results"]["global"]) == {"vis->ir", "ir->vis"}
    summary = json.loads((tmp_path / "run" / "finetune_summary.json").read_text())
    assert summary["step"] == 2 and summary["adaptation"] == "lora" and summary["no_keypoints"] == 0
    assert (tmp_path / "run" / "final" / "adapter").is_dir()
