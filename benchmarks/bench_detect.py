"""Time and peak memory of each detection stage on a UK Biobank-sized and a clinical-sized scan.

Each scenario runs in a fresh subprocess so that its peak RSS is its own. Prints a Markdown table (paste it
into the README) and writes ``build/bench/bench_detect.json``.

    python benchmarks/bench_detect.py [--model default] [--device cpu|cuda|auto] [--scenarios ukbb clinical]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCENARIOS = {
    # name: (size ijk, spacing ijk mm)
    "ukbb": ((256, 288, 48), (0.8, 0.8, 3.0)),
    "clinical": ((512, 512, 150), (0.45, 0.45, 1.0)),
}


def make_scan(name: str, seed: int = 7):
    """A synthetic SWI scan with CMBs, resampled onto the scenario's exact grid."""
    import SimpleITK as sitk

    from CMBDetectLib.synth.generator import SynthConfig, generate_case
    from CMBDetectLib.volume import volume_from_sitk, volume_to_sitk

    size, spacing = SCENARIOS[name]
    config = SynthConfig(in_plane_range_mm=(spacing[0], spacing[0]), slice_thickness_mm=spacing[2])
    case = generate_case(seed, "swi", n_cmbs=8, config=config)
    source = volume_to_sitk(case.image)
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing(spacing)
    centre = np.array(source.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in source.GetSize()]))
    reference.SetOrigin(tuple(centre - (np.array(size) - 1) / 2 * np.array(spacing)))
    image = sitk.Resample(source, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return volume_from_sitk(image)


def run_scenario(name: str, model_name: str, device: str, repeats: int) -> dict:
    import torch

    from CMBDetectLib.model_package import ModelPackage
    from CMBDetectLib.pipeline import REFINE_CHUNK, DetectionParameters, DetectionSession

    volume = make_scan(name)
    model = ModelPackage.load(model_name)
    base = DetectionParameters.for_model(model, "swi")
    start = time.perf_counter()
    session = DetectionSession(model, device=device)
    result = session.run(volume, "swi", None, base)
    total = time.perf_counter() - start
    rss_after_run = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def timed(params) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            session.refilter(params)
            times.append(time.perf_counter() - t)
        return float(np.median(times))

    disc_values = np.linspace(0.05, 0.95, repeats)
    disc_times = []
    for value in disc_values:  # a different Th_Cdisc each time, like a slider being dragged
        t = time.perf_counter()
        session.refilter(DetectionParameters(**{**base.to_dict(), "th_disc": float(value)}))
        disc_times.append(time.perf_counter() - t)
    # A Th_Cdet drag as the panel runs it: a preview re-filter per slider step (new candidates scored with one
    # student view), then the real scores REFINE_CHUNK candidates per event-loop turn, then a final re-filter.
    det_times, chunk_times, refine_times = [], [], []
    for value in np.linspace(max(0.05, base.th_det - 0.3), min(0.95, base.th_det + 0.3), 7):
        params = DetectionParameters(**{**base.to_dict(), "th_det": float(value)})
        t = time.perf_counter()
        session.refilter(params, preview=True)
        det_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        while True:
            c = time.perf_counter()
            remaining = session.score_provisional(params.th_det, REFINE_CHUNK)
            chunk_times.append(time.perf_counter() - c)
            if not remaining:
                break
        session.refilter(params)
        refine_times.append(time.perf_counter() - t)
    return {
        "scenario": name, "grid": SCENARIOS[name][0], "spacing": SCENARIOS[name][1],
        "device": session.device_used, "torch_threads": torch.get_num_threads(),
        "total_s": total, "timings": result.timings,
        "candidates": len(result.candidates), "final": len(result.final_candidates),
        "refilter_th_disc_ms_median": 1000 * float(np.median(disc_times)),
        "refilter_th_disc_ms_max": 1000 * float(np.max(disc_times)),
        "refilter_th_det_ms_median": 1000 * float(np.median(det_times)),
        "refilter_th_det_ms_max": 1000 * float(np.max(det_times)),
        "refine_chunk_ms_max": 1000 * float(np.max(chunk_times)),
        "refine_total_ms_max": 1000 * float(np.max(refine_times)),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_after_detection_mb": rss_after_run,
    }


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
        torch_version = torch.__version__
    except ImportError:
        gpu, torch_version = "?", "?"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, Python {platform.python_version()}, torch {torch_version}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=list(SCENARIOS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="build/bench/bench_detect.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_scenario(args.child, args.model, args.device, args.repeats)))
        return 0
    rows = []
    for name in args.scenarios:
        print(f"running {name} ...", file=sys.stderr)
        child = subprocess.run([sys.executable, __file__, "--child", name, "--model", args.model, "--device",
                                args.device, "--repeats", str(args.repeats)], capture_output=True, text=True)
        if child.returncode != 0:
            print(child.stderr, file=sys.stderr)
            return child.returncode
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    machine = machine_description()
    print(f"\nMachine: {machine}\n")
    print("| scan | device | end to end | preprocessing (N4 / vessels / FRST) | stage 1 | stage 2 + post | "
          "peak RAM | Th_Cdisc refilter | Th_Cdet refilter (preview) | real scores (longest step / all) | "
          "candidates / final |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        t = row["timings"]
        parts = " / ".join(f"{t.get('features.' + k, float('nan')):.1f}" for k in ("n4", "vessel_suppression", "frst"))
        size = "x".join(str(s) for s in row["grid"])
        spacing = "x".join(str(s) for s in row["spacing"])
        print(f"| {row['scenario']} {size} @ {spacing} mm | {row['device']} | {row['total_s']:.1f} s | "
              f"{t.get('features', float('nan')):.1f} s ({parts}) | {t.get('stage1', float('nan')):.1f} s | "
              f"{t.get('discrimination_and_postprocessing', float('nan')):.2f} s | "
              f"{row['peak_rss_mb'] / 1024:.2f} GB | {row['refilter_th_disc_ms_median']:.1f} ms "
              f"(max {row['refilter_th_disc_ms_max']:.1f}) | {row['refilter_th_det_ms_median']:.0f} ms "
              f"(max {row['refilter_th_det_ms_max']:.0f}) | {row['refine_chunk_ms_max']:.0f} ms / "
              f"{row['refine_total_ms_max']:.0f} ms | {row['candidates']} / {row['final']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
