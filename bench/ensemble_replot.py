"""Redraw every figure of bench/out/ensemble from its saved JSON (no model is run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mergescope.analysis import scaling, similarity, spaces, stitching, weights

OUT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "out" / "ensemble"
PLOTS = {"_spaces": spaces.plot, "_cka": similarity.plot, "_stitch": stitching.plot}

for path in sorted(OUT.glob("*.json")):
    stem = path.stem
    plot = next((f for suffix, f in PLOTS.items() if stem.endswith(suffix)), None)
    if "_weights" in stem:
        plot = weights.plot
    elif "_scaling" in stem:
        plot = scaling.plot
    if plot is not None:
        plot(json.loads(path.read_text()), path.with_suffix(".png"))
        print("redrew", path.with_suffix(".png").name)
