"""The manifest of a new run is a pure function of what defines the run, and the reader's
validation accepts exactly what it builds."""

import copy

import pytest

from ghostproj.errors import GhostprojError
from ghostproj.jobs.run_records import build_manifest
from ghostproj.store.fingerprint import fingerprint
from ghostproj.store.manifest import LayerInfo, validate_manifest

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
    assert m["fingerprint"] == fingerprint(PARTS) and m["dim"] == 256 + 256
    assert [layer["offset"] for layer in m["layers"]] == [0, 256]
    assert m["projector"] == {"kind": "gaussian", "seed": 0, "file": "projector.safetensors"}
    assert m["shards"] == [] and m["complete"] is False
    validate_manifest(m, "manifest.json")
    assert manifest(parts=dict(PARTS, bias="true"))["fingerprint"] != m["fingerprint"]


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["layers"].reverse(), "starts at column"),
    (lambda m: m.update(store_dtype="int8"), "store dtype 'int8'"),
    (lambda m: m["layers"][0].update(k_in=0), "rank below 1"),
    (lambda m: m.update(complete="yes"), "'complete' is not a boolean"),
    (lambda m: m["shards"].append({"file": "grads-r000-00000.safetensors", "rows": 1, "sha256": "xyz"}), "bad 'sha256'"),
    (lambda m: m.pop("projector") and m.update(projector={"kind": "gaussian"}), "lacks 'kind' or 'seed'"),
])
def test_validation_names_what_is_wrong(edit, match):
    m = copy.deepcopy(manifest())
    edit(m)
    with pytest.raises(GhostprojError, match=match):
        validate_manifest(m, "manifest.json")


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
