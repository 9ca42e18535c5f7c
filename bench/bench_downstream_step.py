"""One training step of the downstream U-Net on the CPU: fp32 vs bf16 autocast vs bf16 + torch.compile.

The step is the trainer's own (``train.training_step``: forward under autocast, fp32 loss, Adam)
on a fixed batch, at 128 and 256 px. Variants: ``fp32 NCHW`` (what main's trainer ran), then the
trainer's channels-last layout (``train.memory_format``) in fp32, in bf16 (what the trainer runs
now on a CPU with native bf16) and in bf16 under ``torch.compile``. They are timed in alternating rounds
(the machine is shared and noisy) and the median per-step time of each is reported, with the
compile time of the compiled variant and how many steps it takes to earn it back.

    .venv/bin/python -m bench.bench_downstream_step                 # about 5 minutes on 2 cores
    .venv/bin/python -m bench.bench_downstream_step --sizes 256 --rounds 5
    .venv/bin/python -m bench.bench_downstream_step --device cuda   # fp32 vs fp16 (unmeasured here)
"""

import argparse
import os
import statistics
import time

import torch

from models.downstream.train import memory_format, training_step
from models.downstream.unet import UNet
from models.precision import cpu_has_native_bf16


def make_variant(name: str, size: int, args, device: torch.device):
    """(step function, seconds spent compiling) for one variant, already warmed up."""
    torch.manual_seed(0)
    layout = torch.contiguous_format if name.endswith("NCHW") else memory_format(device)
    model = UNet(in_channels=args.channels, width=args.width).to(device, memory_format=layout).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    amp_dtype = None if name.startswith("fp32") else (torch.float16 if device.type == "cuda" else torch.bfloat16)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    network = torch.compile(model) if name.endswith("compile") else model
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, args.channels, size, size, generator=generator).to(device)
    images = images.contiguous(memory_format=layout)
    masks = (torch.rand(args.batch, 1, size, size, generator=generator) > 0.97).float().to(device)
    weak = torch.zeros(args.batch, dtype=torch.bool, device=device)

    def step():
        training_step(network, optimizer, scaler, (images, masks, weak), 0.9, amp_dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    step()  # the compiled variant compiles here
    first = time.perf_counter() - started
    step()
    return step, first


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1, help="1: grayscale products like magnetic tile")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    reduced = "fp16" if device.type == "cuda" else "bf16"
    names = ["fp32 NCHW", "fp32", reduced] + ([] if args.no_compile else [f"{reduced}+compile"])
    print(f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_native_bf16()}; "
          f"U-Net width {args.width}, batch {args.batch}, {args.channels} channel(s); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    print("\n| px | variant | s/step (median) | speed-up vs fp32 NCHW | first step s | steps for compile to pay |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for size in args.sizes:
        steps, compile_seconds = {}, {}
        for name in names:
            steps[name], compile_seconds[name] = make_variant(name, size, args, device)
        times = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                started = time.perf_counter()
                for _ in range(args.steps):
                    steps[name]()
                times[name].append((time.perf_counter() - started) / args.steps)
        base = statistics.median(times["fp32 NCHW"])
        for name in names:
            median = statistics.median(times[name])
            # compiling pays once the per-step saving against plain bf16 covers the extra first step
            saved = statistics.median(times[reduced]) - median
            extra = compile_seconds[name] - median
            earned_back = f"{extra / saved:.0f}" if name.endswith("compile") and saved > 0 else "-"
            print(f"| {size} | {name} | {median:.3f} | {base / median:.2f}x | {compile_seconds[name]:.1f} "
                  f"| {earned_back} |", flush=True)
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
