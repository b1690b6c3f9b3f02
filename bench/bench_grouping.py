"""Stage two's padding with length grouping by prompt + longer reply (before) vs by the shared row each forward pads
to (`trainutil.width_of`, what `dpo train` groups by with --share-prompt): all HH-RLHF harmless-test pair rows and
the same rows as 4-reply sets, encoded as bench_packing.py encodes them (SmolLM2 tokenizer, --max-length 1024).
Planning only (no model forward); prints the markdown rows of bench/RESULTS.md's section.

    .venv/bin/python bench/bench_grouping.py
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _packing_report as R  # noqa: E402
from stages.model.smollm import ensure_smollm2  # noqa: E402
from stages.stage2.prepare import Item, SetItem  # noqa: E402
from stages.stage2.trainutil import batches_for_epoch, width_of  # noqa: E402


def main() -> None:
    data = R.load_data(ensure_smollm2("cache/models", n_layers=2))
    pools = {"hh": [Item(e, 0.0, 0.0) for e in data["hh"]],
             "hh_sets": [SetItem(s, (0.0,) * len(s.replies), (), ()) for s in data["hh_sets"]]}
    groupings = (("prompt + longer reply (before)", None),
                 ("shared row width (now)", width_of(SimpleNamespace(share_prompt=True))))
    print("| data | micro-batch | length grouping by | padding |\n|---|---|---|---|")
    for name, items in pools.items():
        for bs in (4, 8):
            for label, width in groupings:
                rows = [R.rows_of(b) for b in batches_for_epoch(items, bs, 0, 0, width=width)]
                padding = R.pad(R._shape([[[r] for r in b] for b in rows]))
                print(f"| {R.DATA[name]} | --batch-size {bs} | {label} | {padding:.1%} |")


if __name__ == "__main__":
    main()
