"""Time of ``--from-scores`` re-selection (no data pass), split into model build and selection proper.

    python benchmarks/reselect_time.py --model vit_base_patch16_224 --images 8

Makes a score file from a few random images once, then times, in this process, ``reselect`` at several budgets,
granularities and norms; reports the model-build part (timm ``create_model``, which for a randomly initialised
model is mostly weight initialisation) apart from the rest (checksum, scores, top-k, mask).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import numpy as np
    from PIL import Image

    from fps_cli import models as fps_models
    from fps_cli.formats import save_scores
    from fps_cli.models import ModelSpec
    from fps_cli.selector import SelectOptions, reselect, run_select

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rng = np.random.default_rng(0)
        for c in range(2):
            (root / "data" / f"c{c}").mkdir(parents=True)
            for i in range(args.images // 2):
                Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
                    root / "data" / f"c{c}" / f"{i}.png"
                )
        spec = ModelSpec(args.model, pretrained=False, img_size=args.img_size)
        first = run_select(spec, root / "data", SelectOptions(budget=0.05), num_workers=0, batch_size=4)
        save_scores(root / "scores.safetensors", first.stats, first.score_provenance)

        build_seconds = []
        original = fps_models.create_model

        def timed_create(s):
            start = time.perf_counter()
            try:
                return original(s)
            finally:
                build_seconds.append(time.perf_counter() - start)

        import fps_cli.selector as selector

        selector.create_model = timed_create
        rows = []
        for budget, granularity, norm in [(0.05, "neuron", "l1"), (0.02, "layer", "l2"), (0.1, "global", "l1")]:
            start = time.perf_counter()
            reselect(root / "scores.safetensors", SelectOptions(budget=budget, granularity=granularity, norm=norm))
            total = time.perf_counter() - start
            rows.append(
                {
                    "budget": budget,
                    "granularity": granularity,
                    "norm": norm,
                    "total_s": total,
                    "model_build_s": build_seconds[-1],
                    "selection_s": total - build_seconds[-1],
                }
            )
    if args.json:
        print(json.dumps({"model": args.model, "runs": rows}))
        return
    print(f"{args.model}: re-selection from a score file (no data pass)")
    for r in rows:
        print(
            f"  budget {r['budget']:<5} {r['granularity']:<7} {r['norm']}: total {r['total_s']:.3f} s = model build "
            f"{r['model_build_s']:.3f} s + selection {r['selection_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
