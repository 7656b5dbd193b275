"""Is the training loop invariant to `micro_batch` (same global batch)? Decides whether
`micro_batch` may leave the stage keys (issue 12): only if losses and weights agree to 1e-6.

    .venv/bin/python -m bench.micro_batch_invariance --steps 20   (from the repository root)

Trains retro-nano (4 x 64, fp32) on real wiki rows with micro_batch 1, 2, 4, 8 at global
batch 8 and prints the max relative difference of every step's loss and of the final weights
against micro_batch 8 (one forward for the whole batch).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from retro.components.training.checkpoint import LocalRuntime
from retro.components.training.loop import train
from tests.training.helpers import job, rows_of, wiki_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data", default="../shared/data")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    train_rows, _ = wiki_rows(Path(args.data), tmp)
    runs = {}
    for mb in (8, 4, 2, 1):
        j = job(tmp / f"mb{mb}", train_rows, steps=args.steps, micro_batch=mb)
        train(j, LocalRuntime(tmp / f"ck{mb}"))
        losses = np.array([r["loss"] for r in rows_of(j.metrics_file) if r["kind"] == "train"])
        weights = load_file(str(j.final_dir / "decoder" / "model.safetensors"))
        runs[mb] = (losses, weights)
    ref_loss, ref_w = runs[8]
    print(f"{args.steps} steps, global batch 8, fp32; vs micro_batch 8:")
    for mb in (4, 2, 1):
        loss, w = runs[mb]
        dl = float(np.max(np.abs(loss - ref_loss) / np.abs(ref_loss)))
        dw = max(float(((w[k] - ref_w[k]).abs().max() / ref_w[k].abs().max().clamp_min(1e-12))
                       ) for k in w)
        print(f"  micro_batch {mb}: max rel loss diff {dl:.2e}, max rel weight diff {dw:.2e}, "
              f"last-step loss diff {abs(loss[-1] - ref_loss[-1]):.2e}")


if __name__ == "__main__":
    main()
