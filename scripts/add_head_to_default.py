"""Put a trained AIS head into the embedded default model (how session 8 shipped it).

    python scripts/add_head_to_default.py HEAD_RUN/last.safetensors

Takes the ``ais_head.*`` tensors of a ``napari-sam train --head-only`` run started from the
default model (or an ``aux_head.pt`` of the session-8 experiment script) and writes them
into ``src/napari_sam/weights/default.safetensors``, keeping every other tensor and the
file's training metadata; the config gains ``ais_head_hidden``. The run's own weights must
equal the default model's outside the head (checked), so interactive use and AMG are unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from napari_sam.models.ais_head import AisHead
from napari_sam.models.checkpoint import load_state_dict, save_model
from napari_sam.models.zoo import embedded_weights_path, load_model


def main() -> None:
    source = Path(sys.argv[1])
    target = embedded_weights_path()
    model = load_model("default")
    if source.suffix == ".pt":
        head_sd = torch.load(source, weights_only=True)
    else:
        sd, _ = load_state_dict(source)
        for key, value in model.state_dict().items():
            if not key.startswith("ais_head.") and not torch.equal(sd[key], value):
                raise SystemExit(f"{source}: {key} differs from the default model's")
        head_sd = {k[len("ais_head."):]: v for k, v in sd.items() if k.startswith("ais_head.")}
    hidden = int(head_sd["net.0.weight"].shape[1])
    model.ais_head = AisHead(int(model.prompt_encoder.embed_dim), hidden)
    model.ais_head.load_state_dict(head_sd)
    model.config = dataclasses.replace(model.config, ais_head_hidden=hidden)
    with safe_open(str(target), "pt") as f:
        meta = {k: v for k, v in (f.metadata() or {}).items() if k != "napari_sam_config"}
    meta["ais_head"] = json.dumps({"source": str(source), "hidden": hidden})
    save_model(model.eval(), target, meta)
    print(f"{target}: AIS head (hidden {hidden}) added")


if __name__ == "__main__":
    main()
