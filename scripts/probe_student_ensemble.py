"""Experiment probe: would averaging the students of several trainings help?

``python scripts/probe_student_ensemble.py BASE OTHER [OTHER ...]`` runs BASE (features, stage 1, candidates at
``Th_Cdet`` 0.4 or ``--th-det``, with BASE's post-processing) on the development set, scores every kept
candidate with each package's student (test-time flips on) and with the averages of the students, and prints,
per modality, the most CMBs found at <= 1 FP/scan over a ``Th_Cdisc`` sweep. Every OTHER must share BASE's
stage 1 (e.g. a ``train_variant.py`` run without ``--retrain-stage1``), so all students see the same candidates.

A simplified protocol, not the calibration's: ``Th_Cdet`` and the filters stay fixed, and a candidate is a TP
when the CMB instance map is non-zero within one voxel of its centroid (each CMB counted once). For BASE alone it
reproduces the calibration's per-modality counts when BASE was calibrated at ``Th_Cdet`` 0.4.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))

from calibrate_model import development_cases  # noqa: E402
from evaluate_model import DEV_PER_CELL  # noqa: E402

from CMBDetectLib.candidates import extract_patches  # noqa: E402
from CMBDetectLib.model_package import ModelPackage  # noqa: E402
from CMBDetectLib.networks.discriminator import student_probabilities  # noqa: E402
from CMBDetectLib.pipeline import DetectionParameters, DetectionSession  # noqa: E402
from CMBDetectLib.training.data import ras_to_working_index  # noqa: E402
from CMBDetectLib.volume import read_volume  # noqa: E402

TH_DET = 0.4
TH_DISC_SWEEP = np.round(np.arange(0.05, 1.0, 0.05), 2)


class TeacherClassifier(torch.nn.Module):
    """The teacher's patch-classifier logits alone, so it scores patches exactly like a student."""

    def __init__(self, teacher: torch.nn.Module) -> None:
        super().__init__()
        self.teacher = teacher

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.teacher(patches)[1]


def score_scans(dev: Path, base: ModelPackage, packages: dict[str, ModelPackage],
                with_teacher: bool = False, th_det: float = TH_DET) -> list[dict]:
    # each scorer reads patches of its own size (a package may train its student on other patches than BASE's)
    students = {name: (package.network("student", "cpu").eval(), package.patch_size("student"))
                for name, package in packages.items()}
    if with_teacher:
        students[f"{base.label}-teacher"] = (TeacherClassifier(base.network("teacher", "cpu")).eval(),
                                             base.patch_size("teacher"))
    rows = []
    cases = development_cases(dev, DEV_PER_CELL)
    for number, (case, image, instances_path, modality) in enumerate(cases, start=1):
        instances = ndimage.grey_dilation(read_volume(instances_path).array, size=(3, 3, 3))
        params = DetectionParameters.for_model(base, modality)
        params.th_det, params.th_disc = th_det, 0.0
        session = DetectionSession(base, device="cpu")
        kept = [c for c in session.run(read_volume(image), modality, params=params).candidates if c.final]
        hits = []
        for candidate in kept:
            i, j, k = np.round(candidate.centroid_ijk).astype(int)
            k, j, i = (min(max(v, 0), s - 1) for v, s in zip((k, j, i), instances.shape))
            hits.append(int(instances[k, j, i]))
        scores: dict[str, list[float]] = {name: [] for name in students}
        if kept:
            centres = np.round(ras_to_working_index(session.features.grid,
                                                    np.array([c.centroid_ras for c in kept])))
            batches = {size: torch.from_numpy(np.ascontiguousarray(
                extract_patches(session.features.channels, centres, size), dtype=np.float32))
                for size in {size for _, size in students.values()}}
            with torch.no_grad():
                for name, (student, size) in students.items():
                    scores[name] = student_probabilities(student, batches[size], flips=True).numpy().tolist()
        rows.append({"modality": modality, "hits": hits, "scores": scores})
        print(f"[{number}/{len(cases)}] {case}: {len(kept)} candidates", flush=True)
    return rows


def best_at_one_fp(rows: list[dict], names: tuple[str, ...], modality: str) -> tuple[int, int, float]:
    mine = [row for row in rows if row["modality"] == modality]
    best = (0, 0, 1.0)
    for threshold in TH_DISC_SWEEP:
        tp = fp = 0
        for row in mine:
            if not row["hits"]:
                continue
            mean = np.mean([row["scores"][name] for name in names], axis=0)
            tp += len({hit for hit, score in zip(row["hits"], mean) if hit and score >= threshold})
            fp += sum(1 for hit, score in zip(row["hits"], mean) if not hit and score >= threshold)
        if fp <= len(mine) and (tp > best[0] or (tp == best[0] and fp < best[1])):
            best = (tp, fp, float(threshold))
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base")
    parser.add_argument("others", nargs="*")
    parser.add_argument("--teacher", action="store_true", help="also score with BASE's teacher")
    parser.add_argument("--th-det", type=float, default=TH_DET)
    parser.add_argument("--dev", default="build/evaluation_dev/dev")
    args = parser.parse_args()
    base = ModelPackage.load(args.base)
    packages: dict[str, ModelPackage] = {}
    for package in [base, *map(ModelPackage.load, args.others)]:
        # Two packages of the same name and version (e.g. a from-scratch rerun) are told apart by their folder.
        packages[str(package.path) if package.label in packages else package.label] = package
    rows = score_scans(Path(args.dev), base, packages, args.teacher, args.th_det)
    names = list(rows[0]["scores"]) if rows else list(packages)
    for size in range(1, len(names) + 1):
        for combo in itertools.combinations(names, size):
            parts = {m: best_at_one_fp(rows, combo, m) for m in ("swi", "t2s", "qsm")}
            total = [sum(p[i] for p in parts.values()) for i in (0, 1)]
            detail = ", ".join(f"{m} {tp} / {fp} FP @ {t:.2f}" for m, (tp, fp, t) in parts.items())
            print(f"{' + '.join(combo)}: {total[0]} CMBs, {total[1]} FP ({detail})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
