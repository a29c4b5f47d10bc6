"""The "twin" of a hermesd store: an ordinary Hugging Face model directory with the same weights.

Exported stage by stage (one safetensors shard per stage, never the whole model in memory) so that
transformers and accelerate can load exactly the weights hermesd streams.
Run ``python -m bench.twin STORE OUT [--verify]``; it prints one JSON line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

INDEX_NAME = "model.safetensors.index.json"
MARKER = "hermesd_manifest_sha256"  # ties a twin to the exact store it was made from


def _manifest_digest(store_dir: Path) -> str:
    return hashlib.sha256((store_dir / "manifest.json").read_bytes()).hexdigest()


def _full_name(module: str, local: str) -> str:
    return f"{module}.{local}" if module else local


def is_complete(store_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> bool:
    """True when ``out_dir`` is a finished twin of this very store (index, config and every shard)."""
    out_dir = Path(out_dir)
    try:
        index = json.loads((out_dir / INDEX_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if index.get("metadata", {}).get(MARKER) != _manifest_digest(Path(store_dir)):
        return False
    shards = set(index.get("weight_map", {}).values())
    return (out_dir / "config.json").is_file() and bool(shards) and all((out_dir / s).is_file() for s in shards)


def export_twin(store_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Write the twin of ``store_dir`` to ``out_dir``; skip the work if a complete twin is there.

    Tied tensors are not stored in the store and are not written: transformers re-ties them from the
    config (``tie_word_embeddings``). The twin is built in ``OUT.partial`` and renamed when complete.
    """
    from safetensors.torch import load_file, save_file

    from hermesd.store.manifest import Manifest

    store_dir, out_dir = Path(store_dir), Path(out_dir)
    if is_complete(store_dir, out_dir):
        return {"exported": False, "twin": str(out_dir)}
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but is not a complete twin of {store_dir}; remove it first")
    started = time.perf_counter()
    manifest = Manifest.load(store_dir)
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    stored = [s for s in manifest.stages if s.tensors]
    weight_map: dict[str, str] = {}
    total = 0
    for number, stage in enumerate(stored, start=1):
        shard = f"model-{number:05d}-of-{len(stored):05d}.safetensors"
        tensors = load_file(store_dir / stage.file)
        if set(tensors) != set(stage.tensors):
            raise ValueError(f"{stage.file}: tensors {sorted(tensors)} differ from the manifest's")
        renamed = {_full_name(stage.module, local): t for local, t in tensors.items()}
        save_file(renamed, partial / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(renamed, shard))
        total += sum(t.numel() * t.element_size() for t in renamed.values())
        del tensors, renamed
    (partial / "config.json").write_text(json.dumps(manifest.config, indent=2), encoding="utf-8")
    for name in manifest.files:  # tokenizer / processor files, so tools that insist on them find them
        if (store_dir / name).is_file() and not name.endswith(".safetensors"):
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(store_dir / name, partial / name)
    index = {"metadata": {"total_size": total, MARKER: _manifest_digest(store_dir)}, "weight_map": weight_map}
    (partial / INDEX_NAME).write_text(json.dumps(index, indent=2), encoding="utf-8")
    os.replace(partial, out_dir)
    return {"exported": True, "twin": str(out_dir), "shards": len(stored), "bytes": total,
            "seconds": time.perf_counter() - started}


def verify_twin(store_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load the twin with ``from_pretrained`` and check it equals the store, tensor by tensor.

    Raises AssertionError on missing or unexpected keys, an untied head, or any differing tensor.
    """
    import torch
    import transformers
    from safetensors.torch import load_file

    from hermesd.store.manifest import Manifest

    started = time.perf_counter()
    manifest = Manifest.load(store_dir)
    model_class = getattr(transformers, manifest.architecture)  # the class the store was made from
    model, info = model_class.from_pretrained(out_dir, dtype=getattr(torch, manifest.dtype), output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, f"twin loads with problems: {problems}"
    state = model.state_dict()
    checked = 0
    for stage in manifest.stages:
        for local, ref in stage.tied.items():
            tied = state[_full_name(stage.module, local)]
            owner = state[_full_name(manifest.stage(ref.stage).module, ref.tensor)]
            assert tied.data_ptr() == owner.data_ptr(), f"{stage.module}.{local} is not tied to {ref}"
        for local, tensor in load_file(Path(store_dir) / stage.file).items():
            name = _full_name(stage.module, local)
            assert torch.equal(state[name], tensor), f"{name} differs between the twin and the store"
            checked += 1
    return {"verified": True, "tensors_checked": checked, "verify_seconds": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    """CLI: export (if needed) and optionally verify a twin; print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m bench.twin", description=__doc__)
    parser.add_argument("store", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--verify", action="store_true", help="load the twin with from_pretrained and compare")
    args = parser.parse_args(argv)
    result = export_twin(args.store, args.out)
    if args.verify:
        result.update(verify_twin(args.store, args.out))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
