"""Multi-node Ray on one machine: a build runs across a `ray.cluster_utils.Cluster`, and a node killed in
the middle of a model stage changes nothing in the output.

The cluster is a head with no CPUs (it only schedules, like docker/compose.yaml's head) and two worker
nodes of one CPU each, all on loopback (pipeline.runtime.ensure_offline_env keeps Ray off the machine's
network address). ~700 MB per node; about a minute in all.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.executors import LocalExecutor, RayExecutor
from pipeline.shards import DatasetDir
from tests.faults import SlowSquare, diff_trees, make_toy_input, run_toy_chain, tree_digests

pytestmark = pytest.mark.integration

# `_stage.json` holds the config hash, which includes the probe directory; the rest must be identical.
EXCLUDE = ["_stage.json"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # the session's local Ray (ray_local): this module needs its own cluster
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "object_store_memory": 80 * 2**20})
    # The second worker declares one (logical) GPU: Ray schedules by declared resources, so GPU placement is
    # testable without a GPU; torch inside the actor still sees none and runs on CPU.
    workers = [c.add_node(num_cpus=1, num_gpus=g, object_store_memory=80 * 2**20) for g in (0, 1)]
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def _nodes_used(probe: Path) -> set[str]:
    return {p.read_text() for p in probe.iterdir()} if probe.is_dir() else set()


def test_cluster_is_on_loopback(cluster):
    import ray

    from pipeline.runtime import init_ray

    c, _ = cluster
    init_ray(c.address)
    addresses = {n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]}
    assert addresses == {"127.0.0.1"}
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3


def test_build_across_nodes_equals_local_build(cluster, tmp_path):
    c, workers = cluster
    make_toy_input(tmp_path / "in", n_shards=4, rows=24)
    run_toy_chain(tmp_path / "in", tmp_path / "local", executor="local", delay=0.0)
    probe = tmp_path / "probe"
    run_toy_chain(tmp_path / "in", tmp_path / "ray", executor="ray", delay=0.02, address=c.address,
                  probe_dir=str(probe))
    expected = tree_digests(tmp_path / "local", exclude=EXCLUDE)
    got = tree_digests(tmp_path / "ray", exclude=EXCLUDE)
    assert diff_trees(expected, got) == []
    # The model stage's actors ran on worker nodes only (the head has no CPUs).
    used = _nodes_used(probe)
    assert used and used <= {n.node_id for n in workers}
    assert DatasetDir(tmp_path / "ray" / "offset2").complete()


def test_gpu_actors_land_on_gpu_nodes(cluster, tmp_path):
    c, workers = cluster
    make_toy_input(tmp_path / "in", n_shards=2, rows=8)
    probe = tmp_path / "probe"
    # The driver (this process) has no GPU; the cluster has one on workers[1]: actors must go there.
    RayExecutor(num_actors=2, actor_cpus=0.25, actor_gpus=0.5, address=c.address).run(
        SlowSquare(delay=0.0, probe_dir=str(probe)), tmp_path / "in", tmp_path / "out")
    assert _nodes_used(probe) == {workers[1].node_id}
    assert DatasetDir(tmp_path / "out").complete()


def test_node_killed_during_model_stage(cluster, tmp_path):
    c, workers = cluster
    make_toy_input(tmp_path / "in", n_shards=6, rows=40)
    probe = tmp_path / "probe"
    # Reference: the same stage, undisturbed, in-process.
    LocalExecutor().run(SlowSquare(delay=0.0, probe_dir=str(probe)), tmp_path / "in", tmp_path / "ref")
    for p in probe.iterdir():
        p.unlink()

    out = DatasetDir(tmp_path / "ray")
    killed: dict[str, object] = {}

    def kill_an_actor_node() -> None:
        # Wait until the stage is well under way (a shard committed), then remove, without grace, a
        # worker node that hosts one of the stage's actors.
        deadline = time.monotonic() + 120
        # (refresh: the workers commit in other processes; a DatasetDir's listing is a snapshot)
        while not out.refresh().done_ids() and time.monotonic() < deadline:
            time.sleep(0.05)
        used = _nodes_used(probe)
        for node in workers:
            if node.node_id in used:
                killed["done_before"] = list(out.refresh().done_ids())
                c.remove_node(node, allow_graceful=False)
                killed["node"] = node.node_id
                return

    killer = threading.Thread(target=kill_an_actor_node, daemon=True)
    killer.start()
    summary = RayExecutor(num_actors=2, actor_cpus=0.5, address=c.address).run(
        SlowSquare(delay=0.1, probe_dir=str(probe)), tmp_path / "in", tmp_path / "ray"
    )
    killer.join(timeout=30)

    assert "node" in killed, "no node was killed: the stage ended before the fault could be injected"
    assert len(killed["done_before"]) < 6, "the kill came after every shard was already finished"
    assert summary.processed == [f"{i:05d}" for i in range(6)]
    # Actors were restarted on the surviving node: some worker started after the kill, on another node.
    assert _nodes_used(probe) - {killed["node"]}
    assert diff_trees(tree_digests(tmp_path / "ref", exclude=EXCLUDE),
                      tree_digests(tmp_path / "ray", exclude=EXCLUDE)) == []
    assert out.complete()
