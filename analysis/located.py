"""The "located units" file: what `scripts/locate_language.py` hands to steering and fine-tuning.

A JSON document (`located.json`):

    {"format": "multilingual-clt/located-units", "version": 1,
     "model_dir": ..., "model_sha256": ..., "clt_dir": ... | null, "langs": [...], "n_layers": L,
     "layers":   {"decision": {lang: first layer from which the lens's top language is lang, or null},
                  "language_features": {lang: [layers holding its identity features, most first]},
                  "lape_neurons": {lang: [layers holding its LAPE neurons, most first]}},
     "neurons":  {lang: [[layer, index], ...]}        LAPE language neurons (top 1%)
     "neurons_5pct": {lang: [[layer, index], ...]}    the 5% variant
     "features": {lang: [[layer, index], ...]}        language-identity CLT features (empty without a CLT)
     "feature_aligned_neurons": {lang: [[layer, index], ...]}   MLP neurons whose output weights align
                  most with the decoders of the language's features (fine-tuning targets),
     "feature_sets": {strategy: {lang: [[layer, index], ...]}}  (version 2) ranked CLT features of each
                  selection strategy — entropy, output, attribution, aligned (analysis/feature_selection.py)}

Version 1 files (no feature_sets) still load: their `features` become the `entropy` set.

`load_located` validates the structure, and (given a model) that every unit exists in it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from training import hook_points
from training.config import atomic_write_json

FORMAT = "multilingual-clt/located-units"
VERSION = 2
READABLE_VERSIONS = (1, 2)
UNIT_KEYS = ("neurons", "neurons_5pct", "features", "feature_aligned_neurons")


def validate_located(doc: dict, model=None, clt=None) -> dict:
    if doc.get("format") != FORMAT or doc.get("version") not in READABLE_VERSIONS:
        raise ValueError(
            f"not a located-units file (format {doc.get('format')!r}, version {doc.get('version')!r}); "
            f"expected {FORMAT!r} version {VERSION}"
        )
    if "feature_sets" not in doc:  # version 1: the entropy rule was the only feature set
        doc = {**doc, "version": VERSION, "feature_sets": {"entropy": doc.get("features", {})}}
    langs = doc["langs"]
    sets = {f"feature_sets.{s}": units for s, units in doc.get("feature_sets", {}).items()}
    for key, units in [(k, doc.get(k, {})) for k in UNIT_KEYS] + list(sets.items()):
        extra = sorted(set(units) - set(langs))
        if extra:
            raise ValueError(f"{key} has languages {extra} that are not in langs {langs}")
        for lang, items in units.items():
            for item in items:
                if (
                    len(item) != 2
                    or not all(isinstance(v, int) for v in item)
                    or not 0 <= item[0] < doc["n_layers"]
                ):
                    raise ValueError(
                        f"{key}[{lang}] holds {item!r}: expected [layer, index] with 0 ≤ layer < "
                        f"{doc['n_layers']}"
                    )
    if model is not None:
        if model.config.n_layer != doc["n_layers"]:
            raise ValueError(
                f"located units are for {doc['n_layers']} layers, the model has {model.config.n_layer}"
            )
        n_neurons = hook_points.adapter(model).d_mlp
        for key in ("neurons", "neurons_5pct", "feature_aligned_neurons"):
            for lang, items in doc.get(key, {}).items():
                bad = [item for item in items if not 0 <= item[1] < n_neurons]
                if bad:
                    raise ValueError(f"{key}[{lang}] names neurons {bad[:3]} outside 0…{n_neurons - 1}")
    if clt is not None:
        for key, units in [("features", doc.get("features", {}))] + list(sets.items()):
            for lang, items in units.items():
                bad = [item for item in items if not 0 <= item[1] < clt.config.n_features]
                if bad:
                    raise ValueError(
                        f"{key}[{lang}] names features {bad[:3]} outside 0…{clt.config.n_features - 1}"
                    )
    return doc


def save_located(path: str | Path, doc: dict) -> Path:
    doc = validate_located({"format": FORMAT, "version": VERSION, **doc})  # fills feature_sets if absent
    atomic_write_json(path, doc)
    return Path(path)


def load_located(path: str | Path, model=None, clt=None, model_dir: str | Path | None = None) -> dict:
    from training.fingerprint import in_release

    path = in_release(path, "located.json")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run scripts/locate_language.py first")
    doc = validate_located(json.loads(path.read_text()), model, clt)
    if model_dir is not None and doc.get("model_sha256"):
        from training.fingerprint import model_fingerprint

        if model_fingerprint(model_dir) != doc["model_sha256"]:
            raise ValueError(
                f"{path} was located on {doc['model_dir']}, whose weights differ from {model_dir}'s"
            )
    return doc


@torch.no_grad()
def feature_aligned_neurons(
    model, clt, features: list[tuple[int, int]], per_lang: int = 32
) -> list[list[int]]:
    """MLP neurons (layer k, j) whose output row c_proj[j] is most aligned (|cosine|, summed over the
    given features) with what the features' decoders write into layer k's MLP output."""
    from clt.export import folded_weights

    if not features:
        return []
    folded = folded_weights(clt)
    scores = []
    for k, block in enumerate(model.transformer.h):
        rows = block.mlp.c_proj.weight.detach().cpu().float()  # [neurons, d]: neuron j writes rows[j]
        rows = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
        writes = [folded["W_dec"][l][f, k - l] for l, f in features if l <= k]
        if not writes:
            scores.append(torch.zeros(rows.shape[0]))
            continue
        writes = torch.stack(writes)
        writes = writes / writes.norm(dim=1, keepdim=True).clamp(min=1e-12)
        scores.append((writes @ rows.T).abs().sum(0))
    flat = torch.stack(scores).flatten()
    n_neurons = scores[0].numel()
    top = flat.topk(min(per_lang, int((flat > 0).sum()))).indices.tolist()
    return [[i // n_neurons, i % n_neurons] for i in top]


def layers_by_count(units: list[list[int]]) -> list[int]:
    counts: dict[int, int] = {}
    for layer, _ in units:
        counts[layer] = counts.get(layer, 0) + 1
    return [layer for layer, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]


def located_from_sections(
    model_dir: str, clt_dir: str | None, langs: list[str], model, sections: dict
) -> dict:
    """The located-units contract built from a location report's sections (analysis/locate.py)."""
    from training.fingerprint import model_fingerprint

    lape_section = sections.get("lape", {}).get("selections", {})
    names = list(lape_section)
    neurons = {l: [list(u) for u in lape_section[names[0]]["by_lang"][l]] for l in langs} if names else {}
    neurons5 = (
        {l: [list(u) for u in lape_section[names[1]]["by_lang"][l]] for l in langs} if len(names) > 1 else {}
    )
    features = {
        l: [[f["layer"], f["feature"]] for f in items]
        for l, items in sections.get("features", {}).get("catalogue", {}).items()
    }
    aligned = sections.get("features", {}).get("aligned_neurons", {})
    lens_section = sections.get("lens", {}).get("by_prompt_lang", {})
    return {
        "model_dir": model_dir,
        "model_sha256": model_fingerprint(model_dir),
        "clt_dir": clt_dir,
        "langs": langs,
        "n_layers": model.config.n_layer,
        "layers": {
            "decision": {l: e["own_language_leads_from_layer"] for l, e in lens_section.items()},
            "language_features": {l: layers_by_count(units) for l, units in features.items()},
            "lape_neurons": {l: layers_by_count(units) for l, units in neurons.items()},
        },
        "neurons": neurons,
        "neurons_5pct": neurons5,
        "features": features,
        "feature_aligned_neurons": aligned,
        "feature_sets": {
            "entropy": features,
            **{
                strategy: {l: [[f["layer"], f["feature"]] for f in items] for l, items in ranked.items()}
                for strategy, ranked in sections.get("feature_sets", {}).get("sets", {}).items()
            },
        },
    }
