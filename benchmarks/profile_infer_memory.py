"""Resident memory of one inference (route ``ours`` of ``bench_infer.py``) stage by stage.

Run: PYTHONPATH=<checkout> .venv/bin/python benchmarks/profile_infer_memory.py --work DIR [--shape 512 512 300]
     [--spacing 0.78 0.78 1.0] [--model small]

``DIR`` receives the synthetic CT and checkpoints of ``bench_infer.py`` unless it holds them already. The
inference runs in this process with its stages (the functions named in ``STAGES``, where the checkout has them)
wrapped; a thread reads VmRSS from ``/proc/self/status`` every 50 ms. Each stage prints its seconds, the RSS
(MiB) at its start and end, the highest sample during it, and the process's high-water mark (``ru_maxrss``) at
its end, which is exact whatever the sampling misses. ``PYTHONPATH`` picks the checkout, so the same script
profiles the code before and after a change.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_infer

STAGES = {
    "universal.infer.batch": ("read_ct", "predict_volume", "write_prediction", "class_statistics", "export_nifti"),
    "universal.infer.predict": ("resample", "predict_on_grid", "predict_logits", "postprocess_masks",
                                "label_map_on_source_grid"),
}


class RssSampler(threading.Thread):
    """Reads the process's VmRSS (MiB) every ``period`` seconds and keeps the highest value since ``reset``."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.highest = 0.0

    @staticmethod
    def rss_mib() -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def reset(self) -> float:
        self.highest = now = self.rss_mib()
        return now

    def run(self) -> None:
        while True:
            self.highest = max(self.highest, self.rss_mib())
            time.sleep(self.period)


def wrap_stages(sampler: RssSampler) -> None:
    """Replace each stage function with one that prints, when it returns, its seconds, RSS at start and end, the
    highest sample during it and ru_maxrss (MiB), indented by nesting depth."""
    depth = [0]

    def wrapped(name, function):
        @functools.wraps(function)
        def stage(*args, **kwargs):
            outer_highest = sampler.highest
            start = sampler.reset()
            began = time.perf_counter()
            depth[0] += 1
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1
                end = sampler.rss_mib()
                peak = max(sampler.highest, end)
                maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                print(f"{'  ' * depth[0]}{name}: {time.perf_counter() - began:.1f} s, RSS {start:.0f} -> {end:.0f} "
                      f"MiB, peak {peak:.0f}, maxrss {maxrss:.0f}", flush=True)
                sampler.highest = max(outer_highest, peak)
        return stage

    for module_name, names in STAGES.items():
        module = importlib.import_module(module_name)
        for name in names:
            if hasattr(module, name):
                setattr(module, name, wrapped(name, getattr(module, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300))
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.78, 0.78, 1.0))
    parser.add_argument("--model", choices=tuple(bench_infer.MODELS), default="small")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if not (args.work / "ct.nii.gz").exists():
        bench_infer.write_ct(args.work / "ct.nii.gz", tuple(args.shape), tuple(args.spacing))
        bench_infer.make_checkpoints(args.work)
    import universal

    print(f"code: {Path(universal.__file__).parent}", flush=True)
    sampler = RssSampler()
    sampler.start()
    wrap_stages(sampler)
    out = args.work / f"out_profile_{time.strftime('%H%M%S')}"
    began = time.perf_counter()
    bench_infer.route_ours(args.work / "ct.nii.gz", args.work / bench_infer.MODELS[args.model], out, monai32=False,
                           device="cpu")
    print(f"total {time.perf_counter() - began:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
