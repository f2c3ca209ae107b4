"""`webbody train` / `webbody evaluate` from the command line, and the end-to-end flow on the demo corpus."""

from __future__ import annotations

import json

import pytest

from flows.cli import main as cli_main
from sapiensid.data.synthetic import write_shards


def test_train_then_evaluate_cli(tmp_path, capsys):
    shards = tmp_path / "bundle"
    write_shards(shards, n_identities=4, per_identity=4, split="train", samples_per_shard=16)
    write_shards(shards, n_identities=4, per_identity=3, split="test", samples_per_shard=16, image_seed=1)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "train:\n  model: tiny\n  batch_size: 4\n  keep_tokens: 32\n  num_workers: 0\n  max_steps: 2\n"
        "  warmup_steps: 1\n  shuffle_buffer: 4\n  progress: false\n"
    )
    code = cli_main(["train", str(cfg), "--no-prefect", "--set", f"train_shards={shards}",
                     "--set", f"output_dir={tmp_path / 'run'}"])
    assert code == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000002" / "DONE").exists()
    assert list((tmp_path / "run" / "tensorboard").glob("events.*"))
    capsys.readouterr()
    code = cli_main(["evaluate", "--no-prefect", "--checkpoint", str(tmp_path / "run"),
                     "--dataset", f"wb=webbody_shards:{shards}", "--output", str(tmp_path / "eval")])
    assert code == 0
    res = json.loads((tmp_path / "eval" / "evaluation.json").read_text())["results"]
    assert res["wb"]["general"]["num_valid_query"] == 4
    assert "| wb | general |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--checkpoint", "x", "--dataset", "no-kind-here"])


@pytest.mark.slow
@pytest.mark.realmodel
def test_end_to_end_on_demo_corpus(tmp_path):
    out = tmp_path / "e2e"
    code = cli_main(["end-to-end", "demo", "--no-prefect", "--output", str(out),
                     "--set", "max_steps=8", "--set", "ckpt_every=4", "--set", "num_workers=0",
                     "--set", "tensorboard=false", "--set", "progress=false"])
    assert code == 0
    result = json.loads((out / "end_to_end.json").read_text())
    assert (tmp_path / "e2e" / "train" / "checkpoints" / "step_00000008" / "DONE").exists()
    assert result["checkpoint"].endswith("step_00000008")
    report = json.loads((out / "evaluation" / "evaluation.json").read_text())
    held = result["evaluation"]["held_out"]
    # Never the training split: the demo bundle has no test split, so a generated held-out set is used.
    assert held["training_split_evaluated"] is False and held["identities_also_in_training"] == 0
    assert held["dataset"] in report["results"] and "webbody_train" not in report["results"]
    assert (out / "evaluation" / "evaluation.md").read_text().startswith("# SapiensID evaluation")


def test_end_to_end_evaluates_held_out_identities_only(tmp_path):
    from flows.end_to_end import eval_datasets

    bundle = tmp_path / "bundle"
    write_shards(bundle, n_identities=3, per_identity=3, split="train", samples_per_shard=16)
    # No test split: a generated held-out set, none of whose identities is in training.
    datasets, held = eval_datasets(None, bundle, tmp_path / "run")
    assert [d["name"] for d in datasets] == ["generated_held_out"] and held["identities"] == 8
    assert held["training_identities"] == 3 and held["identities_also_in_training"] == 0
    assert datasets[0]["split"] == "test" and "train" not in datasets[0]["path"].rsplit("/", 1)[-1]
    again, _ = eval_datasets(None, bundle, tmp_path / "run")  # a re-run reuses the same set
    assert again == datasets
    # A test split of other identities: used as is.
    write_shards(bundle, n_identities=2, per_identity=3, split="test", samples_per_shard=16, image_seed=1,
                 label_offset=10)
    datasets, held = eval_datasets(None, bundle, tmp_path / "run")
    assert datasets == [{"name": "webbody_test", "kind": "webbody_shards", "path": str(bundle), "split": "test"}]
    assert held["identities"] == 2
    # A "test" split that shares identities with training is refused, not scored.
    leaky = tmp_path / "leaky"
    write_shards(leaky, n_identities=3, per_identity=3, split="train", samples_per_shard=16)
    write_shards(leaky, n_identities=2, per_identity=3, split="test", samples_per_shard=16, image_seed=1)
    with pytest.raises(RuntimeError, match="also training identities"):
        eval_datasets(None, leaky, tmp_path / "run2")
