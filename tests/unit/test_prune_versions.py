"""Version retention: old weights go, every manifest (the lineage) and `latest` stay."""

import os

from trainer.checkpoint import all_manifests, latest_version, prune_versions, write_json


def make_version(folder, number):
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text("{}")
    write_json(folder / "manifest.json", {"version": number, "name": folder.name})


def test_old_weights_are_dropped_and_manifests_kept(tmp_path):
    versions = tmp_path / "versions"
    for number in range(5):
        make_version(versions / f"v{number:04d}", number)
    make_version(versions / "rejected" / "v0005", 5)
    os.symlink("v0004", versions / "latest")
    pruned = prune_versions(tmp_path, keep=2)
    assert [p.name for p in pruned] == ["v0000", "v0001", "v0002"]
    for name in ("v0000", "v0001", "v0002"):
        assert [f.name for f in (versions / name).iterdir()] == ["manifest.json"]
    for name in ("v0003", "v0004", "rejected/v0005"):
        assert (versions / name / "model.safetensors").is_file()
    assert [m["version"] for m in all_manifests(tmp_path, include_rejected=True)] == [
        0, 1, 2, 3, 4, 5]
    assert latest_version(tmp_path).name == "v0004"
    assert prune_versions(tmp_path, keep=2) == []  # nothing more to drop
