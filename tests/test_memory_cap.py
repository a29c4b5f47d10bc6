"""Under a real cgroup memory cap smaller than the model, the streamed model runs and is still exact."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from bench.cgroup import run_capped, unavailable_reason
from hermesd.store.convert import convert, open_source
from hermesd.store.manifest import Manifest

pytestmark = [pytest.mark.slow, pytest.mark.skipif(unavailable_reason() is not None, reason=str(unavailable_reason()))]

CAP = 700 << 20
CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 8, "n_embd": 1024, "n_head": 16,
          "vocab_size": 50257, "n_positions": 256, "tie_word_embeddings": True}
CHILD = """
import json, sys, numpy, torch, hermesd
store, out = sys.argv[1], sys.argv[2]
ids = torch.arange(0, 50000, 777)[None, :64]
with hermesd.load(store, prefetch=1) as engine, torch.inference_mode():
    logits = engine.model(ids, use_cache=False).logits
    numpy.save(out, logits[0].numpy(), allow_pickle=False)
    print(json.dumps({"stats": engine.stats.to_dict(), "plan": engine.plan.to_dict()}))
"""


def _reference(store) -> torch.nn.Module:
    """The plain transformers model with every tensor of the store loaded (no hermesd code path)."""
    manifest = Manifest.load(store)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)).eval()
    state = {}
    for stage in manifest.stages:
        for local, tensor in load_file(store / stage.file).items():
            state[f"{stage.module}.{local}" if stage.module else local] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # tied to the embedding
    model.tie_weights()
    return model


def test_model_larger_than_the_cap_streams_without_oom(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    store = tmp_path / "store"
    convert(open_source(None, random_config=config), store)
    weights = Manifest.load(store).weight_bytes()
    # torch + transformers alone take over 300 MiB: the whole model cannot be in memory under the cap.
    assert weights + (300 << 20) > CAP

    out = tmp_path / "logits.npy"
    run = run_capped([sys.executable, "-c", CHILD, str(store), str(out)], CAP)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.oom_kills == 0 and run.peak_bytes <= CAP
    report = json.loads(run.stdout)
    assert report["stats"]["peak_rss_bytes"] < CAP

    ids = torch.arange(0, 50000, 777)[None, :64]
    with torch.inference_mode():
        want = _reference(store)(ids, use_cache=False).logits[0]
    np.testing.assert_allclose(np.load(out, allow_pickle=False), want.numpy(), atol=1e-5, rtol=1e-5)
