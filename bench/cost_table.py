"""The README's POC runtime and cost table, from measured throughput (bench/train_speed.py --size full) and dated
GPU prices (bench/gpu_prices.yaml).

Run: `.venv/bin/python bench/cost_table.py [--params params.yaml] [--prices bench/gpu_prices.yaml]`

For each GPU with a measurement: start-up (process start to first step, from the restart section) + `max_steps`
training steps at the committed params' measured steps per second (mixed-length clips) + the validations
(`val_every`, `val_max_utts` clips) and the eval stage on val (two models) at the measured greedy-decoding RTFx.
Held-out test sets add decoding time in proportion to their audio; the table says how much per audio hour. A GPU
without a measurement gets no runtime: nothing here is scaled from another GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medasr.params import Params, load_params  # noqa: E402


def _rtfx(result: dict[str, Any], batch_size: int) -> float:
    """Mean RTFx over the measured clip lengths at the measured decode batch size nearest to `batch_size`."""
    sizes = sorted({row["batch_size"] for row in result["decode"]})
    nearest = min(sizes, key=lambda b: abs(b - batch_size))
    rows = [row["rtfx"] for row in result["decode"] if row["batch_size"] == nearest]
    return sum(rows) / len(rows)


def poc_runtime(result: dict[str, Any], p: Params) -> dict[str, float]:
    """Seconds per phase of a POC run (`dvc repro` on a fresh pod, data stages aside) on the measured GPU."""
    ours = next(row for row in result["compare"] if row["run"].startswith("ours: committed"))
    steps_per_s = ours["steps_timed"] / ours["seconds"]
    mixed = result["sets"]["mixed"]
    mean_clip_s = mixed["audio_s"] / mixed["clips"]
    validations = p.train.max_steps // p.train.val_every if p.train.val_every else 0
    val_audio = validations * p.train.val_max_utts * mean_clip_s
    eval_audio = 2 * p.subset.val_size * mean_clip_s  # base and fine-tuned model on the val split
    return {
        # 0 when the restart section did not run (or failed): the table then says start-up is not included
        "start_s": result.get("restart", {}).get("fresh_start", {}).get("seconds_from_process_start", 0.0),
        "train_s": p.train.max_steps / steps_per_s,
        "validation_s": val_audio / _rtfx(result, p.train.batch_size),
        "eval_s": eval_audio / _rtfx(result, p.eval.batch_size),
        "eval_s_per_test_audio_hour": 2 * 3600 / _rtfx(result, p.eval.batch_size),
    }


def measurement(files: str | list[str] | None, root: Path) -> dict[str, Any] | None:
    """One GPU's benchmark result, merged from the files its sections were written to (later files win); None
    until every file exists and the sections the table needs are there."""
    paths = [root / f for f in ([files] if isinstance(files, str) else files or [])]
    if not paths or not all(p.is_file() for p in paths):
        return None
    merged: dict[str, Any] = {}
    for path in paths:
        merged |= json.loads(path.read_text())
    return merged if all(k in merged for k in ("compare", "decode", "defaults", "sets")) else None


def table(prices: list[dict[str, Any]], p: Params, root: Path = REPO) -> str:
    lines = [
        f"| GPU | $/h (source) | fits default batch | POC runtime ({p.train.max_steps} steps) | POC cost | "
        "+ per test-set audio hour |",
        "|---|---|---|---|---|---|",
    ]
    for gpu in prices:
        rate = gpu["usd_per_hour"]
        price = f"{rate:.2f} ({gpu['source']})" if rate is not None else f"- ({gpu['source']})"
        result = measurement(gpu.get("measured_as"), root)
        if result is None:
            lines.append(f"| {gpu['name']} | {price} | not measured | not measured | - | - |")
            continue
        phases = poc_runtime(result, p)
        total_h = (phases["start_s"] + phases["train_s"] + phases["validation_s"] + phases["eval_s"]) / 3600
        peaks = [row["peak_gib"] for row in result["defaults"] if "peak_gib" in row]
        fits = "yes" if all(row.get("fits_a100_40gb") for row in result["defaults"]) else "no"
        memory = f"peak {max(peaks):.1f} GiB (A100 40 GB: {fits})" if peaks else "no GPU memory measured"
        extra_min = phases["eval_s_per_test_audio_hour"] / 60
        lines.append(
            f"| {gpu['name']} ({result['environment']['date'][:10]}) | {price} | {memory} | "
            f"{total_h * 60:.0f} min{'' if phases['start_s'] else ' (start-up not measured)'} | "
            f"{f'${total_h * rate:.2f}' if rate is not None else '-'} | "
            f"{extra_min:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--prices", type=Path, default=REPO / "bench" / "gpu_prices.yaml")
    args = parser.parse_args()
    prices = yaml.safe_load(args.prices.read_text())["gpus"]
    print(table(prices, load_params(args.params)))


if __name__ == "__main__":
    main()
