"""Experiment helper: train a variant of the ``make model`` recipe.

``python scripts/train_variant.py --work build/model --version 1.4.1 --set teacher.epochs=10 ...`` copies the
finished stage-1 checkpoint and mined candidates of ``WORK/train_work`` (what ``make model`` left), trains the
teacher and the student with the recipe changed by ``--set``, and calibrates the package on the development
set. Because training is deterministic, ``make model`` with the same changes written into its recipe
reproduces the variant from scratch; this only saves re-running stage 1 and the mining while choosing.
``--retrain-stage1`` trains every network again (for changes to stage 1), reusing only the feature cache.
``--reuse-teacher`` also copies the finished teacher checkpoint, so only the student trains (for changes to the
student; the student's initial weights depend only on (seed, stage), so it is the student an uninterrupted
``make model`` with the same changes would train).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate_model import calibrate  # noqa: E402
from make_model import CONFIG, DATA, TRAIN_SEED, reuse_stage1  # noqa: E402

from CMBDetectLib.progress import text_progress  # noqa: E402
from CMBDetectLib.training.trainer import train_model  # noqa: E402


def set_value(config: dict, assignment: str) -> None:
    key, _, text = assignment.partition("=")
    *path, last = key.split(".")
    target = config
    for part in path:
        target = target.setdefault(part, {})
    target[last] = json.loads(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="build/model")
    parser.add_argument("--version", required=True)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                        help="recipe change, e.g. teacher.epochs=10 or student.augmentation.flip_probability=0.5")
    parser.add_argument("--seed", type=int, default=TRAIN_SEED,
                        help="training seed of the teacher and student (stage 1 is reused as trained)")
    parser.add_argument("--retrain-stage1", action="store_true",
                        help="train stage 1 (and mine its candidates) again instead of reusing make model's")
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="also reuse make model's finished teacher: train only the student")
    args = parser.parse_args()
    work = Path(args.work)
    config = json.loads(json.dumps(CONFIG))
    for assignment in args.set:
        set_value(config, assignment)
    config["version"] = args.version
    config["cache_dir"] = str(work / "feature_cache")
    variant_work = work / f"train_work_{args.version}"
    if args.retrain_stage1:
        shutil.rmtree(variant_work, ignore_errors=True)     # a fresh run, not a resumed older one
    else:
        reuse_stage1(work / "train_work", variant_work)
        if args.reuse_teacher:
            shutil.copy2(work / "train_work" / "checkpoints" / "teacher.pt", variant_work / "checkpoints")
    out = work / f"{config['name']}-{args.version}"
    if out.exists():
        shutil.rmtree(out)
    package = train_model([work / "data" / "train"], out, config=config, seed=args.seed, progress=text_progress(),
                          resume=True, work_dir=variant_work)
    calibrate(package.path)
    print(f"variant {package.path} (data {DATA}, seed {args.seed}); changes: {args.set}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
