"""Train recipes in one process with Axolotl's own API (``load_cfg`` -> ``load_datasets`` -> ``train``).

Used by tests/test_recipes.py: ``python -P tests/recipe_tiny_runner.py SPEC.json RESULTS.json``. SPEC is a
list of ``{"name", "recipe", "overrides", "drop"}``; each recipe is loaded, the overrides applied (the tiny
model, the data, the batch size and step count, CPU precision), written to a YAML file and trained. One
import of Axolotl for all of them keeps the test short. Results: per name, ``ok`` or the error, and the
selection log and run summary the plugin wrote.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import yaml


def run_one(entry: dict) -> dict:
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.train import train

    cfg = yaml.safe_load(Path(entry["recipe"]).read_text())
    for key in entry.get("drop", []):
        cfg.pop(key, None)
    cfg.update(entry["overrides"])
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out.parent / f"{entry['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    t0 = time.perf_counter()
    parsed = load_cfg(str(path))
    meta = load_datasets(cfg=parsed)
    model, _, trainer = train(cfg=parsed, dataset_meta=meta)
    rows = [json.loads(x) for x in (out / "irtuning_selection.jsonl").read_text().splitlines() if x.strip()]
    run = json.loads((out / "irtuning_run.json").read_text())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"ok": True, "seconds": round(time.perf_counter() - t0, 2), "rows": rows, "run": run,
            "adapter_saved": (out / "adapter_model.safetensors").exists(),
            "model_saved": any(out.glob("model*.safetensors")), "trainable_at_end": trainable}


def main(spec_path: str, results_path: str) -> int:
    results = {}
    for entry in json.loads(Path(spec_path).read_text()):
        try:
            results[entry["name"]] = run_one(entry)
        except BaseException as err:  # noqa: BLE001 - every recipe reports, the test names the failing one
            results[entry["name"]] = {"ok": False, "error": f"{type(err).__name__}: {err}",
                                      "trace": traceback.format_exc()[-3000:]}
        Path(results_path).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
