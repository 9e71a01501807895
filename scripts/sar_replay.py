"""Replay SAR's model-recovery rule on the logged per-update entropy of finished runs (docs/methods.md, "SAR on LLMs").

    python scripts/sar_replay.py results/paper-table-cpu results/all-methods-cpu --stability results/stability/final

For every ``metrics.jsonl`` under the given folders, the series of logged mean token entropies (``entropy``, H(p_r)
over the update's tokens) is fed to ``sar.replay_recovery`` as if it were SAR's loss, for each candidate threshold:
the reference's 0.2 nats and fractions of the stream's first loss. With ``--stability``, the stability study's cells
(first and final entropy only, 16 updates) are listed with their final / first ratio and verdict, the quantity the
``initial`` unit thresholds. A replay is evidence about the rule, not a SAR run: a real reset changes what follows.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from zerosiam_llm.files import read_jsonl
from zerosiam_llm.sar import replay_recovery

CANDIDATES = (("nats", 0.2), ("initial", 0.1), ("initial", 0.2), ("initial", 0.3))


def series_rows(folders: list[str], decay: float) -> list[str]:
    rows = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("metrics.jsonl")):
            losses = [m["entropy"] for m in read_jsonl(path) if "entropy" in m]
            if not losses:
                continue
            fired = [replay_recovery(losses, decay, below, unit) for unit, below in CANDIDATES]
            cells = [", ".join(map(str, f)) or "-" for f in fired]
            run = path.parent.relative_to(folder)
            rows.append(f"| {folder}/{run} | {len(losses)} | {losses[0]:.2f} | {min(losses):.2f} | {losses[-1]:.2f} | "
                        + " | ".join(cells) + " |")  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", help="folders searched for metrics.jsonl")
    parser.add_argument("--stability", default=None, help="a stability study folder (stability.json)")
    parser.add_argument("--decay", type=float, default=0.9)
    args = parser.parse_args(argv)
    heads = [f"{below} {'nats' if unit == 'nats' else 'x first'}" for unit, below in CANDIDATES]
    print(f"Updates at which the rule fires (decay {args.decay}), on the logged H(p_r) series\n")
    print("| run | updates | H first | H min | H last | " + " | ".join(heads) + " |")
    print("|---" * (5 + len(heads)) + "|")
    print("\n".join(series_rows(args.folders, args.decay)))
    if args.stability:
        cells = json.loads((Path(args.stability) / "stability.json").read_text(encoding="utf-8"))["cells"]
        print(f"\nStability cells ({args.stability}): final / first H(p_r) (final = mean of the last 3 updates)\n")
        print("| stream | config | lr | seed | verdict | H first | H final | final / first |")
        print("|---|---|---|---|---|---|---|---|")
        for c in sorted(cells, key=lambda c: (c["stream"], c["config"], c["learning_rate"], c["seed"])):
            if c.get("entropy_first") is None:
                continue
            ratio = c["entropy_final"] / c["entropy_first"]
            print(f"| {c['stream']} | {c['config']} | {c['learning_rate']:g} | {c['seed']} | {c['verdict']} | "
                  f"{c['entropy_first']:.2f} | {c['entropy_final']:.2f} | {ratio:.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
