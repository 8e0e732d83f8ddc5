"""Training throughput: images/s for forward + backward + optimizer step, with peak memory.

    .venv/bin/python bench/train_throughput.py [--models resnet18 densenet121 ...] [--steps 5] [--warmup 2]

Batch 16, 224 x 224, 3 channels, synthetic tensors (throughput does not depend on pixel values),
the real training setup otherwise: ``create_model`` -> ``apply_finetune(mode)`` -> AdamW over
``param_groups``, cross-entropy. Each (model, device, precision) runs in a fresh subprocess so that
its peak RSS is its own. On CPU: fp32. With CUDA: fp32 (NCHW) and AMP bf16 + channels_last, each
with ``torch.cuda.max_memory_allocated``. Writes ``bench/results/train_throughput.json``.
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

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results" / "train_throughput.json"
DEFAULT_MODELS = ["resnet18", "densenet121", "efficientnet_b0", "tf_efficientnet_lite0"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(model_name: str, device: str, precision: str, batch: int, size: int, warmup: int, steps: int,
            mode: str, budget_s: float = float("inf")) -> dict:
    """One configuration in this process: warm-up steps, then up to ``steps`` timed steps.

    Timing stops early (after at least one step) once ``budget_s`` seconds of timed steps have
    passed, so that a busy CPU cannot push the whole benchmark past its time budget.
    """
    import torch
    from torch import nn

    from covidcxr.models.finetune import apply_finetune, param_groups
    from covidcxr.models.registry import create_model

    torch.manual_seed(0)
    channels_last = precision == "bf16_channels_last"
    model = create_model(model_name, 2)
    plan = apply_finetune(model, model_name, mode)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(param_groups(model, model_name, lr=1e-4), lr=1e-4)
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    cuda = device.startswith("cuda")

    def step() -> torch.Tensor:
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=channels_last):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    model.train()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if sum(times) >= budget_s:
            break
    loss = float(loss.detach())
    out = {
        "model": model_name, "device": device, "precision": precision, "finetune_mode": mode,
        "batch": batch, "image_size": size, "warmup_steps": warmup, "timed_steps": len(times),
        "trainable_tensors": plan.n_trainable,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "images_per_s": round(batch * len(times) / sum(times), 3),
        "step_s_median": round(sorted(times)[len(times) // 2], 4),
        "step_s_min": round(min(times), 4),
        "final_loss_finite": bool(torch.isfinite(torch.tensor(loss))),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "process_cpu_s": round(time.process_time(), 1),  # vs wall time: how much CPU this process really got
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        out["cuda_max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["gpu"] = torch.cuda.get_device_name()
    return out


def _configurations(models: list[str]) -> list[tuple[str, str, str]]:
    import torch

    configs = [(m, "cpu", "fp32") for m in models]
    if torch.cuda.is_available():
        configs += [(m, "cuda", p) for m in models for p in ("fp32", "bf16_channels_last")]
    return configs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed CPU steps (at most)")
    parser.add_argument("--cpu-budget-s", type=float, default=30.0, help="stop timing a CPU config after this")
    parser.add_argument("--cuda-warmup", type=int, default=5)
    parser.add_argument("--cuda-steps", type=int, default=30)
    parser.add_argument("--mode", default="full", choices=["full", "linear", "last_k"])
    parser.add_argument("--one", nargs=3, metavar=("MODEL", "DEVICE", "PRECISION"), help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    if args.one:  # child process: one configuration, JSON on stdout
        model, device, precision = args.one
        if device == "cpu":
            warmup, steps, budget = args.warmup, args.steps, args.cpu_budget_s
        else:
            warmup, steps, budget = args.cuda_warmup, args.cuda_steps, float("inf")
        print(json.dumps(measure(model, device, precision, args.batch, args.size, warmup, steps, args.mode, budget)))
        return

    from covidcxr.files import write_json
    from covidcxr.progress import make_progress

    load_before = os.getloadavg()
    results, started = [], time.perf_counter()
    configs = _configurations(args.models)
    with make_progress(unit="config") as progress:
        task = progress.add_task("training throughput", total=len(configs))
        for model, device, precision in configs:
            progress.update(task, description=f"{model} {device} {precision}")
            cmd = [sys.executable, __file__, "--one", model, device, precision, "--batch", str(args.batch),
                   "--size", str(args.size), "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--cpu-budget-s", str(args.cpu_budget_s), "--cuda-warmup", str(args.cuda_warmup),
                   "--cuda-steps", str(args.cuda_steps), "--mode", args.mode]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                results.append({"model": model, "device": device, "precision": precision,
                                "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"})
            else:
                results.append(json.loads(done.stdout.strip().splitlines()[-1]))
            progress.advance(task)
    import torch

    record = {
        "benchmark": "train_throughput",
        "what": "forward + backward + AdamW step on synthetic tensors, batch x 3 x size x size, full fine-tuning "
                "unless finetune_mode says otherwise; each configuration in its own process",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda_available": torch.cuda.is_available()},
        "load_average_before": [round(v, 2) for v in load_before],
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "note": "CPU numbers come from a 2-core machine shared with other processes (see load averages); "
                "compare models relative to each other rather than as absolute speeds."
                if (os.cpu_count() or 0) <= 4 else "",
        "total_wall_s": round(time.perf_counter() - started, 1),
        "total_children_cpu_s": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
                                      + resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime, 1),
        "results": results,
    }
    write_json(args.output, record)
    for r in results:
        extra = f", {r['cuda_max_memory_allocated_mb']} MB CUDA" if "cuda_max_memory_allocated_mb" in r else ""
        print(f"{r['model']:>24} {r['device']:>4} {r['precision']:>18}: "
              + (f"{r['images_per_s']:7.2f} img/s, peak RSS {r['peak_rss_mb']:.0f} MB{extra}" if "error" not in r
                 else f"ERROR {r['error']}"))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
