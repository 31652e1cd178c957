"""The manifest of a new run is a pure function of what defines the run, and the reader's
validation accepts exactly what it builds."""

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostproj.errors import GhostprojError
from ghostproj.jobs.run_records import build_manifest
from ghostproj.store.fingerprint import fingerprint
from ghostproj.store.manifest import LayerInfo, Manifest, ShardEntry

LAYERS = [LayerInfo("h.0.mlp.c_fc", "Conv1D", 64, 256, 16, 16, 0), LayerInfo("h.0.mlp.c_proj", "Conv1D", 256, 64, 8, 32, 256)]
PARTS = {"model_weights": "a" * 64, "layers": "b" * 64, "ranks": "c" * 64, "projector": "d" * 64,
         "loss_reduction": "mean", "bias": "false"}


def manifest(**changes):
    args = dict(parts=PARTS, model={"path": "m", "class": "GPT2LMHeadModel"}, data={"path": "d.jsonl", "count": 3},
                loss_reduction="mean", bias=False, projector=("gaussian", 0), layers=LAYERS, store_dtype="bfloat16",
                settings={"batch_size": 8}, created="2026-11-26T00:00:00+00:00")
    args.update(changes)
    return build_manifest(**args)


def test_build_manifest_is_pure_and_valid():
    m = manifest()
    assert m == manifest()  # the same inputs give the same manifest
    assert m.fingerprint == fingerprint(PARTS) and m.dim == 256 + 256
    d = m.to_json()
    assert d["dim"] == 512 and [layer["offset"] for layer in d["layers"]] == [0, 256]
    assert d["projector"] == {"kind": "gaussian", "seed": 0, "file": "projector.safetensors"}
    assert d["shards"] == [] and d["complete"] is False
    assert Manifest.from_json(json.loads(json.dumps(d))) == m  # what is written reads back as it was
    assert manifest(parts=dict(PARTS, bias="true")).fingerprint != m.fingerprint


def test_unknown_keys_are_kept_and_written_back():
    d = dict(manifest().to_json(), later_version={"x": 1})
    m = Manifest.from_json(d)
    assert m.extra == {"later_version": {"x": 1}} and m.to_json() == d


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"].reverse(), "starts at column"),
    (lambda m: m.update(store_dtype="int8"), "store dtype 'int8'"),
    (lambda m: m["layers"][0].update(k_in=0), "rank below 1"),
    (lambda m: m["layers"][0].update(k_in="16"), "layer entry 0 has a bad 'k_in'"),
    (lambda m: m["layers"][1].pop("offset"), "layer entry 1 lacks 'offset'"),
    (lambda m: m.update(layers=[]), "lists no layers"),
    (lambda m: m.update(dim=7), "add up to 512 columns but 'dim' says 7"),
    (lambda m: m.pop("fingerprint"), "lacks 'fingerprint'"),
    (lambda m: m.update(complete="yes"), "bad 'complete' .* not a boolean"),
    (lambda m: m.update(bias=1), "bad 'bias' .* not a boolean"),
    (lambda m: m.update(settings=[]), "bad 'settings' .* not an object"),
    (lambda m: m["shards"].append({"file": "grads-r000-00000.safetensors", "rows": 1, "sha256": "xyz"}), "bad 'sha256'"),
    (lambda m: m["shards"].append({"file": "grads-r000-00000.safetensors", "rows": -1}), "bad 'rows'"),
    (lambda m: m["shards"].append({"file": "../etc/passwd", "rows": 1}), "not a plain shard file name"),
    (lambda m: m["shards"].extend([{"file": "grads-r000-00000.safetensors", "rows": 1}] * 2), "twice"),
    (lambda m: m["shards"].append("grads-r000-00000.safetensors"), "shard entry 0 is not an object"),
    (lambda m: m.pop("projector") and m.update(projector={"kind": "gaussian"}), "lacks 'kind' or 'seed'"),
    (lambda m: m.update(part={"shard_id": 3, "num_shards": 2}), "'part' is not a shard_id below num_shards"),
    (lambda m: m.update(part={"num_shards": 2}), "'part' is not a shard_id"),
    (lambda m: m.update(steps=[[0, 4], [1]]), "'steps' are not"),
    (lambda m: m.update(coverage={"parameters": 5, "matrices": [1, 2], "by_kind": {}}), "'coverage' is not"),
    (lambda m: m.update(coverage={"parameters": [1, 2], "matrices": [1, 2], "by_kind": {"mlp": "all"}}),
     "'coverage' is not"),
    (lambda m: m.update(factors={"path": "f"}), "'factors' lack the per-layer 'lambda_base'"),
])
def test_validation_names_what_is_wrong(edit, match):
    m = copy.deepcopy(manifest().to_json())
    edit(m)
    with pytest.raises(GhostprojError, match="manifest.json is damaged: .*" + match):
        Manifest.from_json(m, "manifest.json")


def test_the_constructor_refuses_what_no_reader_could_use():
    with pytest.raises(GhostprojError, match="lists no layers"):
        manifest(layers=[])
    with pytest.raises(GhostprojError, match="'h.0.mlp.c_proj' starts at column 0"):
        manifest(layers=[LAYERS[0], LayerInfo("h.0.mlp.c_proj", "Conv1D", 256, 64, 8, 32, 0)])
    with pytest.raises(GhostprojError, match="not a plain shard file name"):
        ShardEntry("../x.safetensors", 1)


def test_recorded_hashes_keep_their_values():
    """Runs and caches on disk hold these hashes: the one tensor hash must give the values
    the earlier per-caller hashes gave (pinned here from them)."""
    import torch

    from ghostproj.engines.projector import LayerProjector, projector_hash
    from ghostproj.store.fingerprint import sampled_weights_hash, weights_hash

    a = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7
    assert projector_hash({"l": LayerProjector(a[:2], a[:, :3])}).startswith("b09e4e1ae85dc029")
    assert weights_hash([("w", a)]).startswith("a27b0c15e4eb1570")
    assert sampled_weights_hash([("w", a)], 5).startswith("9cc64e41215982823")


@settings(max_examples=40, deadline=None, derandomize=True)
@given(ks=st.lists(st.tuples(st.integers(1, 8), st.integers(1, 8)), min_size=1, max_size=5),
       shards=st.lists(st.integers(0, 50), max_size=4), complete=st.booleans(),
       part=st.one_of(st.none(), st.integers(1, 4)), extra=st.dictionaries(st.sampled_from(["a_later_key", "zz"]),
                                                                           st.integers(0, 9)))
def test_what_is_written_reads_back_as_it_was(ks, shards, complete, part, extra):
    """Any manifest the constructor accepts survives the JSON round trip field for field."""
    layers, offset = [], 0
    for n, (k_in, k_out) in enumerate(ks):
        layers.append(LayerInfo(f"layer.{n}", "Linear", 2 * k_in, 3 * k_out, k_in, k_out, offset))
        offset += k_in * k_out
    m = manifest(layers=layers)
    m.shards = [ShardEntry(f"grads-r000-{i:05d}.safetensors", rows, rank=0, bytes=rows * 8) for i, rows in
                enumerate(shards)]
    m.complete, m.extra = complete, extra
    m.part = None if part is None else {"shard_id": part - 1, "num_shards": part, "rows": 3}
    back = Manifest.from_json(json.loads(json.dumps(m.to_json())))
    assert back == m and back.dim == offset and back.rows == sum(shards)
