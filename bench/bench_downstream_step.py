"""One training step of the downstream U-Net on the CPU: layouts, malloc reuse, fp32 vs bf16 (+ compile).

The step is the trainer's own (``train.training_step``: forward under autocast, fp32 loss, Adam)
on a fixed batch, at 128 and 256 px. Variants, each in fp32:

- ``NCHW, fresh maps``: what the trainer ran before issue 16, with glibc's default malloc (every
  large activation can be a new, page-faulted map);
- ``channels-last, fresh maps``;
- ``NCHW`` and ``channels-last`` inside ``host_memory.reused_host_memory``, as evaluate jobs run
  now (which of the two layouts the trainer takes on this CPU is ``train.memory_format``'s choice,
  marked in the table);

and, on a CPU with native bf16 (or on CUDA, in fp16), the trainer's layout in bf16 and in bf16
under ``torch.compile``. They are timed in alternating rounds (the machine is shared and noisy),
each round after one unmeasured step in its own malloc setting; the median per-step time of each
is reported with its page faults per step, the compile time of the compiled variant and how many
steps it takes to earn it back.

    .venv/bin/python -m bench.bench_downstream_step                 # about 10 minutes on 2 cores
    .venv/bin/python -m bench.bench_downstream_step --sizes 256 --rounds 5 --no-compile
    .venv/bin/python -m bench.bench_downstream_step --device cuda   # fp32 vs fp16 (unmeasured here)
"""

import argparse
import os
import resource
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from models.downstream.train import memory_format, training_step
from models.downstream.unet import UNet
from models.host_memory import reused_host_memory
from models.precision import cpu_has_native_bf16

LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}


@dataclass(frozen=True)
class Variant:
    layout: str  # a key of LAYOUTS
    dtype: torch.dtype | None = None  # autocast; None: fp32
    reused_memory: bool = True
    compiled: bool = False

    @property
    def name(self) -> str:
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]
        return (f"{precision} {self.layout}" + ("" if self.reused_memory else ", fresh maps")
                + (" + compile" if self.compiled else ""))


def variants(device: torch.device, with_compile: bool) -> tuple[list[Variant], Variant]:
    """The variants to time, and which of them is what the trainer runs on this device."""
    layout = next(name for name, value in LAYOUTS.items() if value == memory_format(device))
    chosen = [Variant("NCHW", reused_memory=False), Variant("channels-last", reused_memory=False),
              Variant("NCHW"), Variant("channels-last")]
    reduced = torch.float16 if device.type == "cuda" else torch.bfloat16 if cpu_has_native_bf16() else None
    if reduced is None:
        return chosen, Variant(layout)
    chosen.append(Variant(layout, reduced))
    if with_compile:
        chosen.append(Variant(layout, reduced, compiled=True))
    return chosen, Variant(layout, reduced)


def make_variant(variant: Variant, size: int, args, device: torch.device):
    """(step function, seconds of its first step: the compiled variant compiles there), warmed up."""
    torch.manual_seed(0)
    layout = LAYOUTS[variant.layout]
    model = UNet(in_channels=args.channels, width=args.width).to(device, memory_format=layout).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=variant.dtype == torch.float16)
    network = torch.compile(model) if variant.compiled else model
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(args.batch, args.channels, size, size, generator=generator).to(device)
    images = images.contiguous(memory_format=layout)
    masks = (torch.rand(args.batch, 1, size, size, generator=generator) > 0.97).float().to(device)
    weak = torch.zeros(args.batch, dtype=torch.bool, device=device)

    def step():
        training_step(network, optimizer, scaler, (images, masks, weak), 0.9, variant.dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()

    started = time.perf_counter()
    step()
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
    chosen, trainers = variants(device, with_compile=not args.no_compile)
    print(f"{os.cpu_count()} CPU cores, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"capability {torch.backends.cpu.get_cpu_capability()}, native bf16 {cpu_has_native_bf16()}; "
          f"U-Net width {args.width}, batch {args.batch}, {args.channels} channel(s); "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    if trainers.dtype is None:
        print("No bf16 variants: this CPU has no native bf16, so the trainer runs fp32 (bf16 would be emulated).")
    print("\n| px | variant | s/step (median) | speed-up vs fp32 NCHW, fresh maps | page faults/step | first step s "
          "| steps for compile to pay |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    for size in args.sizes:
        steps, first_step = {}, {}
        for variant in chosen:
            steps[variant], first_step[variant] = make_variant(variant, size, args, device)
        times, faults = {v: [] for v in chosen}, {v: [] for v in chosen}
        for _ in range(args.rounds):
            for variant in chosen:
                with reused_host_memory() if variant.reused_memory else nullcontext():
                    steps[variant]()  # in this malloc setting, before the clock starts
                    started, faulted = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    for _ in range(args.steps):
                        steps[variant]()
                    times[variant].append((time.perf_counter() - started) / args.steps)
                    faults[variant].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted) / args.steps)
        base = statistics.median(times[chosen[0]])
        for variant in chosen:
            median = statistics.median(times[variant])
            earned_back = "-"
            if variant.compiled:  # compiling pays once the per-step saving covers the extra first step
                uncompiled = Variant(variant.layout, variant.dtype)
                saved = statistics.median(times[uncompiled]) - median
                earned_back = f"{(first_step[variant] - median) / saved:.0f}" if saved > 0 else "never"
            name = variant.name + (" (the trainer's)" if variant == trainers else "")
            print(f"| {size} | {name} | {median:.3f} | {base / median:.2f}x | {statistics.median(faults[variant]):.0f} "
                  f"| {first_step[variant]:.1f} | {earned_back} |", flush=True)
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
