"""bf16 autocast against fp32 on this CPU, and what qlass picks when ``autocast`` is asked for.

Times a forward of the default model (SmolLM2-135M-Instruct) over ``--tokens`` tokens, fp32 and
under bf16 autocast, interleaved ``--repeats`` times, and prints the medians, the ratio and
what qlass picks here (``qlass.precision``: native bf16 kernels and a bf16 linear layer measured
faster). On most CPUs with native bf16 autocast is the faster of the two; on AVX2-only CPUs it is
several times slower, and on an Intel Xeon with AVX512-BF16 but no AMX 1.74x slower, which is why
qlass runs fp32 there. Usage::

    python benchmarks/bench_autocast.py [--tokens 256] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import TYPE_CHECKING

from bench_args import positive_int, run_main

from qlass.models import default_model_dir
from qlass.precision import use_autocast

if TYPE_CHECKING:
    import torch


def forward_seconds(model: torch.nn.Module, ids: torch.Tensor, bf16: bool) -> float:
    """Wall-clock seconds of one forward of ``ids``, under bf16 autocast when ``bf16``."""
    import torch

    start = time.perf_counter()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        model(input_ids=ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=positive_int, default=256)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch  # after the arguments: a usage error or --help is answered at once
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)

    model = AutoModelForCausalLM.from_pretrained(default_model_dir()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(0))
    for bf16 in (False, True):  # warm-up
        forward_seconds(model, ids[:, :16], bf16)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.repeats):
        for bf16 in (False, True):
            times[bf16].append(forward_seconds(model, ids, bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} thread(s), "
          f"{args.tokens}-token forward, median of {args.repeats}")
    print(f"fp32 {fp32:.2f} s   bf16 autocast {bf16:.2f} s   bf16 / fp32 time {bf16 / fp32:.2f}x")
    print(f"qlass with autocast=true on this CPU runs: {'bf16' if use_autocast(True, 'cpu') else 'fp32'}")


if __name__ == "__main__":
    run_main(main)
