"""`python -m bench.datasets [--rows N] [--rounds R]`: dataset reading and quality statistics at scale.

Generates a deterministic instruction dataset (JSON Lines, 1,000,000 rows by default, kept in
var/bench/ for later runs), then measures, each phase in a
fresh process whose peak memory (max RSS) is read when it ends, in R rounds (2 by default) of
parse, tokenizer, stats:

- parse: parsing.parse_dataset reading and validating the upload into canonical rows (rows/s);
- stats: quality.compute_report on those rows with SmolLM2's tokenizer through its chat template,
  max length 512 (rows/s);
- tokenizer: the tokenizer's own batch encoder (encode_batch_fast, the same batch size) on the
  same chat-template texts; only the encoding is timed (rows/s). Stats should reach at least
  half of this speed.

Goals: parse + validate >= 50,000 rows/s; stats >= 50% of the tokenizer's speed; every phase
under 500 MB whatever the file size. On a shared machine one phase can meet a busier minute than
another, so each phase's best round counts, and the ratio is also given per round, where the
tokenizer and the stats ran back to back; the load average is printed as each phase starts and ends.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "var" / "bench"
MAX_LENGTH = 512
VOCABULARY = (
    "the model data answer question time people way water words number sound place year work world "
    "city river light house school garden morning music paper story letter friend market window "
    "country mountain animal island kitchen doctor teacher engine bridge planet ocean forest winter "
    "summer colour language history science picture journey weather company problem reason moment "
    "simple quick careful bright quiet heavy early honest modern ancient narrow gentle useful strange"
)
PHASES = ("parse", "tokenizer", "stats")


def generate(path: Path, rows: int) -> None:
    """Deterministic rows: short instructions, replies of varied length, a few systems and inputs."""
    rng = random.Random(0)
    words = VOCABULARY.split()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as f:
        for n in range(rows):
            row = {
                "instruction": " ".join(rng.choices(words, k=rng.randint(8, 24))).capitalize() + "?",
                "response": " ".join(rng.choices(words, k=_reply_words(rng))) + ".",
            }
            if n % 10 == 0:
                row["system"] = "You answer briefly and precisely."
            if n % 7 == 0:
                row["input"] = " ".join(rng.choices(words, k=12))
            f.write(json.dumps(row) + "\n")
    partial.rename(path)


def _reply_words(rng: random.Random) -> int:
    """Mostly short replies; one in 200 long enough to pass the max length."""
    return rng.randint(400, 700) if rng.random() < 0.005 else max(1, int(rng.lognormvariate(3.1, 0.6)))


def run_phase(phase: str, source: Path, rows_path: Path) -> dict:
    if phase == "parse":
        from webapp.datasets.parsing import parse_dataset

        started = time.perf_counter()
        report = parse_dataset(source, source.name, task="sft", out_path=rows_path)
        seconds = time.perf_counter() - started
        assert report.usable and not report.errors, report.fatal or report.errors[:3]
        return {"rows": report.rows_ok, "seconds": seconds}
    from worker.models import resolve_base
    from worker.quality import BATCH_ROWS, TokenCounter, _batches, compute_report, read_rows

    model_dir = resolve_base("smollm2-135m-instruct")
    if phase == "stats":
        started = time.perf_counter()
        report = compute_report(rows_path, "sft", model_dir, MAX_LENGTH)
        seconds = time.perf_counter() - started
        return {
            "rows": report["rows"],
            "seconds": seconds,
            "truncated": report["tokens"]["truncated"],
            "duplicates": report["problems"][2]["count"],
            "p50_tokens": report["tokens"]["p50"],
        }
    counter = TokenCounter(model_dir, "sft", MAX_LENGTH)
    encoding = 0.0
    rows = tokens = 0
    for batch in _batches(read_rows(rows_path), BATCH_ROWS):
        conversations = [
            counter.prompt_messages(row) + [{"role": "assistant", "content": row["response"]}] for _, row in batch
        ]
        texts = counter.render(conversations, False)
        started = time.perf_counter()
        encodings = counter.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        encoding += time.perf_counter() - started
        rows += len(texts)
        tokens += sum(len(e) for e in encodings)
    return {"rows": rows, "seconds": encoding, "tokens": tokens}


def measure(phase: str, source: Path, rows_path: Path) -> dict:
    """Run one phase in a fresh Python process; its result and its peak memory."""
    command = [
        sys.executable,
        "-m",
        "bench.datasets",
        "--phase",
        phase,
        "--source",
        str(source),
        "--rows-path",
        str(rows_path),
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"phase {phase} failed")
    result = json.loads(output.strip().splitlines()[-1])
    return result | {"rows_per_s": result["rows"] / result["seconds"], "peak_mb": usage.ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--source", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows-path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.source, args.rows_path)))
        return
    source = BENCH_DIR / f"instructions-{args.rows}.jsonl"
    if not source.is_file():
        started = time.perf_counter()
        generate(source, args.rows)
        print(f"generated {source} in {time.perf_counter() - started:.0f} s")
    rows_path = BENCH_DIR / f"rows-{args.rows}.jsonl"
    print(f"{args.rows:,} rows, {source.stat().st_size / 1e6:.0f} MB; {_load()} on {os.cpu_count()} CPUs")
    rounds = [run_round(n, source, rows_path) for n in range(1, args.rounds + 1)]
    report(rounds)


def run_round(number: int, source: Path, rows_path: Path) -> dict[str, dict]:
    results = {}
    for phase in PHASES:
        load_before = os.getloadavg()[0]
        r = results[phase] = measure(phase, source, rows_path)
        print(
            f"round {number} {phase:10s} {r['rows_per_s']:>10,.0f} rows/s  {r['seconds']:7.1f} s  "
            f"peak {r['peak_mb']:5.0f} MB  load {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
        )
    ratio = results["stats"]["rows_per_s"] / results["tokenizer"]["rows_per_s"]
    print(f"round {number} stats at {ratio:.0%} of the tokenizer's batch speed measured just before")
    return results


def report(rounds: list[dict[str, dict]]) -> None:
    best = {phase: max((r[phase] for r in rounds), key=lambda result: result["rows_per_s"]) for phase in PHASES}
    ratio = best["stats"]["rows_per_s"] / best["tokenizer"]["rows_per_s"]
    print(
        f"best of {len(rounds)}: parse {best['parse']['rows_per_s']:,.0f} rows/s, tokenizer "
        f"{best['tokenizer']['rows_per_s']:,.0f} rows/s, stats {best['stats']['rows_per_s']:,.0f} rows/s "
        f"({ratio:.0%} of the tokenizer); {best['stats']['truncated']:,} rows past {MAX_LENGTH} tokens, median "
        f"{best['stats']['p50_tokens']} tokens; {_load()}"
    )
    goals = {
        "parse + validate >= 50,000 rows/s": best["parse"]["rows_per_s"] >= 50_000,
        "stats >= 50% of the tokenizer's batch speed": ratio >= 0.5,
        "every phase under 500 MB": all(r[phase]["peak_mb"] < 500 for r in rounds for phase in PHASES),
    }
    for goal, met in goals.items():
        print(f"{'met ' if met else 'MISSED'} {goal}")


def _load() -> str:
    return "load average " + " / ".join(f"{load:.2f}" for load in os.getloadavg()) + " (1 / 5 / 15 min)"


if __name__ == "__main__":
    main()
