"""Write models/digits_train.npz: the bundled model's training split, as ``--data`` reads it.

    python -m tools.make_digits_data

The 1,347 training images of the split ``tools/digits_arch.py`` defines
(scikit-learn's digits, ``load_split``): ``input`` float32 (1347, 1, 8, 8),
pixel / 16, and ``labels`` int64. The quick start and ``make demo``
calibrate and train on it (holding out ``--val-fraction`` of it), so they
need nothing but the repository; the 450 test images stay out of it, for the
held-out figures the benchmarks report. Deterministic: a rerun writes the
same arrays.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tools.digits_arch import load_split

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "models" / "digits_train.npz"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    x_train, _, y_train, _ = load_split()
    np.savez_compressed(args.out, input=x_train, labels=y_train)
    print(f"wrote {args.out}: {len(x_train)} samples, {args.out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
