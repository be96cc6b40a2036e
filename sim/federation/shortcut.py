"""The talk's shortcut pitfall: a site whose scanner encodes one class differently in its
pixels (`shortcut: {class, effect: intensity | bit_depth}`), so a model can learn the scanner
instead of the content; and the check of a final model against it (`shortcut_report`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from snowfed.config import require, require_keys, require_number
from snowfed.store import FederationStore

SHORTCUT_EFFECTS = ("intensity", "bit_depth")


def parse_shortcut(spec: Any, key: str, task: str, num_classes: int) -> dict[str, Any] | None:
    """{class: c, effect: intensity (scale) | bit_depth (bits)}: the site encodes class c
    differently in its pixels, a shortcut a model can learn instead of the content."""
    if spec is None:
        return None
    require(task == "classification", key, spec, "unset: the shortcut effect hides a class, so it "
            "needs task=classification")
    require(isinstance(spec, Mapping), key, spec, "a mapping {class, effect, scale | bits}")
    require_keys(spec, ("class", "effect", "scale", "bits"), key, "a key of shortcut")
    cls = spec.get("class")
    require(isinstance(cls, int) and not isinstance(cls, bool) and 0 <= cls < num_classes,
            f"{key}.class", cls, f"a class id from 0 to {num_classes - 1}")
    effect = spec.get("effect", "intensity")
    require(effect in SHORTCUT_EFFECTS, f"{key}.effect", effect, f"one of {', '.join(SHORTCUT_EFFECTS)}")
    if effect == "intensity":
        scale = require_number(spec.get("scale", 0.5), f"{key}.scale", 0.0, 4.0)
        return {"class": cls, "effect": effect, "scale": scale}
    bits = spec.get("bits", 3)
    require(isinstance(bits, int) and 1 <= bits <= 7, f"{key}.bits", bits, "an integer from 1 to 7")
    return {"class": cls, "effect": effect, "bits": bits}


def apply_shortcut(images: np.ndarray, shortcut: Mapping[str, Any]) -> np.ndarray:
    """The site's pixels of the shortcut class: intensity range scaled, or bit depth reduced."""
    if shortcut["effect"] == "intensity":
        return np.clip(np.rint(images.astype(np.float32) * shortcut["scale"]), 0, 255).astype(np.uint8)
    drop = 8 - shortcut["bits"]
    return ((images >> drop) << drop).astype(np.uint8)


def shortcut_report(store: FederationStore, model) -> dict[str, dict[str, Any]]:
    """For each shortcut site: the model's scores on its clean held-out split as the site's
    scanner shows it (shortcut on) and as another site's would (shortcut removed). A model that
    learned the shortcut instead of the content loses accuracy on the second, above all on the
    shortcut class (`class_accuracy_*`)."""
    from snowfed.evaluation import evaluate

    images, clean = store.arrays["images"], store.arrays["clean"]
    report = {}
    for node in store.nodes:
        shortcut = node.get("shortcut")
        if shortcut is None or not node["val"]:
            continue
        val, plain = np.asarray(node["val"]), np.asarray(shortcut["val_plain"])
        targets = np.asarray(clean[val])
        of_class = targets == shortcut["class"]
        entry = {}
        for name, rows in (("with_shortcut", val), ("shortcut_removed", plain)):
            scores = evaluate(model, images[rows], targets)
            entry[f"accuracy_{name}"] = scores["accuracy"]
            entry[f"f1_{name}"] = scores["f1"]
            entry[f"class_accuracy_{name}"] = (
                float(np.mean(model_predictions(model, images[rows[of_class]]) == shortcut["class"]))
                if of_class.any() else None)
        report[node["name"]] = {**{k: shortcut[k] for k in shortcut if k != "val_plain"}, **entry}
    return report


def model_predictions(model, images: np.ndarray) -> np.ndarray:
    import torch

    from snowfed.evaluation import images_to_tensor

    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(images_to_tensor(images).to(device)).argmax(dim=1).cpu().numpy()
