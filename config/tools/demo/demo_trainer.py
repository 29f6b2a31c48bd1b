#!/usr/bin/env python3
"""Demo trainer for gpu-trainer: pretends to train, with real tqdm-format progress on stderr,
checkpoints every --save-every steps and a final model file. Standard library only."""
import argparse
import glob
import os
import re
import sys
import time


def fmt_interval(seconds):
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def bar(desc, n, total, elapsed, rate, postfix):
    """One tqdm `format_meter` line (default bar_format, 10-cell bar, no TTY)."""
    frac = n / total if total else 0
    cells = frac * 10
    full = int(cells)
    parts = " ▏▎▍▌▋▊▉"
    partial = parts[int((cells - full) * 8)] if full < 10 else ""
    body = ("█" * full + partial).ljust(10)
    if rate:
        remaining = fmt_interval((total - n) / rate)
        rate_s = f"{rate:5.2f}it/s" if rate >= 1 else f"{1 / rate:5.2f}s/it"
    else:
        remaining, rate_s = "?", "?it/s"
    return (f"{desc}: {frac * 100:3.0f}%|{body}| {n}/{total} "
            f"[{fmt_interval(elapsed)}<{remaining}, {rate_s}, {postfix}]")


def write_model(path, step):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"DEMO-SAFETENSORS step=%d\n" % step)
        f.write(os.urandom(1024))
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--seconds-per-step", type=float, default=0.25)
    p.add_argument("--stall-at-step", type=int, default=0)
    p.add_argument("--slowdown-at-step", type=int, default=0)
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--fail-at-step", type=int, default=0)
    p.add_argument("--name", default="demo")
    p.add_argument("--note", default="")
    p.add_argument("--dataset", default="dataset")
    p.add_argument("--output", default="output")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()

    os.makedirs(a.output, exist_ok=True)
    images = [f for f in glob.glob(os.path.join(a.dataset, "**", "*"), recursive=True)
              if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp", ".bmp"))]
    print(f"Running demo job: {a.name}")
    if a.note:
        print(f"Note: {a.note}")
    print(f"Dataset: {a.dataset} ({len(images)} images)")
    start = 0
    if a.resume:
        steps = [int(m.group(1)) for f in glob.glob(os.path.join(a.output, f"{a.name}_*.safetensors"))
                 if (m := re.search(r"_(\d{9})\.safetensors$", f))]
        if steps:
            start = max(steps)
            print(f"Resuming from step {start}")
    sys.stdout.flush()

    t0 = time.time()
    loss = 0.9
    sys.stderr.write("\r" + bar(a.name, start, a.steps, 0, None, f"lr: 1.0e-04 loss: {loss:.3e}"))
    sys.stderr.flush()
    for step in range(start + 1, a.steps + 1):
        delay = a.seconds_per_step
        if a.slowdown_at_step and step >= a.slowdown_at_step:
            delay *= 10
        time.sleep(delay)
        if a.stall_at_step and step >= a.stall_at_step:
            # Alive but no progress: the monitor's stall detection must notice.
            while True:
                time.sleep(3600)
        if a.fail_at_step and step >= a.fail_at_step:
            sys.stderr.write("\n")
            raise RuntimeError(f"demo failure at step {step}")
        loss = loss * 0.97
        elapsed = time.time() - t0
        rate = (step - start) / elapsed if elapsed > 0 else None
        sys.stderr.write("\r" + bar(a.name, step, a.steps, elapsed, rate, f"lr: 1.0e-04 loss: {loss:.3e}"))
        sys.stderr.flush()
        if step % a.save_every == 0 and step < a.steps:
            path = os.path.join(a.output, f"{a.name}_{step:09d}.safetensors")
            write_model(path, step)
            sys.stderr.write("\n")
            print(f"Saving at step {step}")
            print(f"Saved checkpoint to {path}")
            sys.stdout.flush()
    sys.stderr.write("\n")
    final = os.path.join(a.output, f"{a.name}.safetensors")
    write_model(final, a.steps)
    print(f"Saved checkpoint to {final}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
