"""The node side of the trust boundary (issue 12): a run config cannot make a SuperNode read, load or write
outside what its own node config allows; simulation's client processes take the run config as it is."""

import os
from pathlib import Path

import pytest

from fedalign_moe.config import load_config
from fedalign_moe.federation.node_policy import TRUST_ENV, NodePolicy, NodePolicyError


def _cfg(**sections):
    return load_config("tiny", overrides=sections)


def _node(**config):
    return NodePolicy.of_node(config, environ={})


def test_simulation_client_processes_take_the_run_config_as_it_is():
    policy = NodePolicy.of_node({"partition-id": 0}, environ={TRUST_ENV: "run-config"})
    cfg = _cfg(data={"source": "csv", "path": "/etc/passwd"}, model={"prefix_cache_dir": "/srv/x"})
    assert policy.trust_run_config and policy.apply(cfg) == cfg


def test_a_data_file_outside_the_nodes_roots_is_refused(tmp_path):
    cfg = _cfg(data={"source": "csv", "path": "/etc/passwd"})
    with pytest.raises(NodePolicyError, match=r"read '/etc/passwd' \(data.path\), outside its data roots \[\]"):
        _node(**{"partition-id": 0}).apply(cfg)
    allowed = tmp_path / "data"
    allowed.mkdir()
    (allowed / "d.csv").write_text("text,label\n")
    inside = _cfg(data={"source": "csv", "path": str(allowed / "d.csv")})
    assert _node(**{"data-roots": f"/nowhere:{allowed}"}).apply(inside).data.path == str(allowed / "d.csv")
    escape = _cfg(data={"source": "csv", "path": f"{allowed}/../../../etc/passwd"})  # resolved before the check
    with pytest.raises(NodePolicyError, match="outside its data roots"):
        _node(**{"data-roots": str(allowed)}).apply(escape)
    (allowed / "link.csv").symlink_to("/etc/passwd")  # a link out of the root is outside too
    with pytest.raises(NodePolicyError, match="outside its data roots"):
        _node(**{"data-roots": str(allowed)}).apply(_cfg(data={"source": "csv", "path": str(allowed / "link.csv")}))


def test_the_nodes_own_data_path_replaces_the_run_configs():
    cfg = _cfg(data={"source": "csv", "path": "/etc/passwd"})
    assert _node(**{"data-path": "/srv/node3.csv"}).apply(cfg).data.path == "/srv/node3.csv"


def test_checkpoints_and_hub_ids_need_the_nodes_permission(tmp_path):
    with pytest.raises(NodePolicyError, match=r"load '/opt/models/x' \(model.backbone\), outside its model roots"):
        _node().apply(_cfg(model={"backbone": "/opt/models/x"}))
    (tmp_path / "ckpt").mkdir()
    assert _node(**{"model-roots": str(tmp_path)}).apply(_cfg(model={"backbone": str(tmp_path / "ckpt")}))
    with pytest.raises(NodePolicyError, match="fetch 'allenai/OLMoE-1B-7B-0924' from the hub"):
        _node().apply(_cfg(model={"backbone": "allenai/OLMoE-1B-7B-0924"}))
    assert _node(**{"allow-hub": "true"}).apply(_cfg(model={"backbone": "allenai/OLMoE-1B-7B-0924"}))
    with pytest.raises(NodePolicyError, match="fetch 'hf:ag_news' from the hub"):
        _node().apply(_cfg(data={"source": "hf:ag_news"}))
    with pytest.raises(NodePolicyError, match="data.wordnet_dir"):
        _node().apply(_cfg(data={"source": "wordnet", "wordnet_dir": "/home/someone"}))


def test_where_a_node_writes_and_its_device_are_its_own():
    cfg = _cfg(model={"prefix_cache_dir": "/etc/cron.d", "build_cache_dir": "/root/.ssh", "device": "cuda"})
    default = _node().apply(cfg)  # the node's own cache, never the run config's places
    home = Path("~/.cache/fedalign-moe").expanduser()
    assert (default.model.prefix_cache_dir, default.model.build_cache_dir) == (str(home / "prefix"), str(home / "models"))
    assert default.model.device == "auto"
    memory_only = _node(**{"cache-dir": "none"}).apply(cfg)
    assert memory_only.model.prefix_cache_dir is None and memory_only.model.build_cache_dir is None
    own = _node(**{"cache-dir": "/var/cache/fl", "device": "cpu"}).apply(cfg)
    assert (own.model.prefix_cache_dir, own.model.build_cache_dir, own.model.device) == (
        "/var/cache/fl/prefix", "/var/cache/fl/models", "cpu")
    key, own_key = cfg.result_key(), own.result_key()
    key["model"].pop("device"), own_key["model"].pop("device")
    assert own_key == key  # the experiment itself is the server's: unchanged


@pytest.mark.parametrize("config, needle", [({"device": "tpu"}, "device must be auto, cpu or cuda"),
                                            ({"allow-hub": "yes"}, "allow-hub must be true or false")])
def test_a_bad_node_config_is_one_clear_error(config, needle):
    with pytest.raises(NodePolicyError, match=needle):
        _node(**config)


def test_the_trust_mark_is_the_nodes_environment_not_the_message():
    assert TRUST_ENV not in os.environ  # a SuperNode started by hand is strict by default
    assert not NodePolicy.of_node({"partition-id": 0, TRUST_ENV: "run-config"}, environ={}).trust_run_config
