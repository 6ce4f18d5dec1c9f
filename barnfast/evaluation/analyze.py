"""Report on a backbone sweep: ``python -m barnfast.evaluation.analyze DIR`` (DIR written by ``barnfast.sweep``).

Writes ``DIR/report.md``, ``DIR/analysis.json`` (every number of the report, for other tools) and
PNG figures under ``DIR/figures/``. The analyses follow "Back to the Barn with LLAMAs" (does a newer
LLM backbone solve *more* questions or *different* ones; calibration; representation stability):

1. Accuracy per backbone, per task (open / mc / yesno) and per category, with the categories grouped
   into perception (colour, shape) and reasoning (count, position); POPE metrics on yes/no; exact
   match and VQA accuracy on open answers.
2. Overlap, for each pair of backbones in sweep order (old → new), over all items of all tasks: the
   2x2 table of items right/wrong, the exact McNemar test, the phi correlation of per-item
   correctness, and the gain split into "more" (solved by the new, not the old) and "different"
   (solved by the old, lost by the new); an UpSet figure of which backbones solve each item.
3. Calibration over the multiple-choice and yes/no items (confidence = the softmax probability of
   the chosen option): ECE and MCE over 15 equal-width bins, top-label and multi-class Brier score,
   a reliability diagram per backbone; open answers (confidence = geometric mean of the greedy
   tokens' probabilities) in a separate row.
4. Representation stability: linear CKA between the decoder's mean-pooled hidden states of the same
   items with clean and perturbed images (Gaussian pixel noise, a one-pixel shift), layer by layer;
   read from ``<backbone>/eval/stability.json``, computed here from the export when missing.

Before these, the report proves and qualifies the comparison (functions ``render_control``,
``statistics``, ``seed_analysis``, ``training_side``):

0. Control: ``control.json`` of the sweep ("controlled: yes" or each difference; manifest hashes,
   vision weights, samples excluded for every backbone).
- Statistics per evaluation file found under ``<run>/eval/``: accuracy with a bootstrap 95% CI, the
  chance baseline, warnings (constant answers, CI containing chance), and per pair the paired
  bootstrap CI of the difference, exact McNemar p and the discordant split with its exact interval;
  the benchmarks' own scores (MME acc+, MMBench circular ...).
- Seeds (``--seeds``): mean ± std per backbone and the seed-vs-seed overlap reference.
- Training side: steps, loss, loss in bits per byte of target text, samples/s, tokens/s, skipped and
  excluded samples, the backbone's variant (base / chat / instruct).

Options: ``--stability-items N`` (16; 0 skips computing missing curves), ``--bins`` (15).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from barnfast.evaluation import scores  # noqa: E402

TASKS = ("open", "mc", "yesno")
CHANCE_LABEL = "chance (mc, yes/no: 1/options; open: majority answer)"
PERCEPTION = ("colour", "shape")
REASONING = ("count", "position")


# -- loading --------------------------------------------------------------------------------------------


def sweep_runs(root: Path) -> list[dict]:
    """``{name, backbone, seed}`` of every run of the sweep (sweep.json; older sweeps: one run per backbone)."""
    cfg_path = root / "sweep.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("runs"):
            return cfg["runs"]
        return [{"name": b, "backbone": b, "seed": cfg.get("seed")} for b in cfg["backbones"]]
    return [{"name": p.name, "backbone": p.name, "seed": None}
            for p in sorted(root.iterdir()) if (p / "eval").is_dir()]


def load_records(run_dir: Path) -> list[dict]:
    """Every evaluation file of a run (``eval/*.jsonl``), each record tagged with ``benchmark`` = the file's
    name (``eval_mc``, ``pope`` ...) and ``key`` = benchmark:id."""
    rows = []
    for path in sorted((run_dir / "eval").glob("*.jsonl")):
        for x in path.read_text().splitlines():
            if x.strip():
                r = json.loads(x)
                r["benchmark"] = path.stem
                r["key"] = f"{path.stem}:{r['id']}"
                rows.append(r)
    if not rows:
        raise SystemExit(f"{run_dir / 'eval'} has no evaluation records; run the sweep to the end first")
    return rows


def load_sweep(root: Path) -> tuple[list[str], dict[str, list[dict]]]:
    """(backbones in sweep order, backbone → the evaluation records of its first-seed run)."""
    runs = sweep_runs(root)
    first_seed = runs[0]["seed"]
    chosen = [r for r in runs if r["seed"] == first_seed]
    return [r["backbone"] for r in chosen], {r["backbone"]: load_records(root / r["name"]) for r in chosen}


def load_stability(root: Path, backbone: str, n_items: int) -> dict | None:
    run = next((r["name"] for r in sweep_runs(root) if r["backbone"] == backbone), backbone)
    path = root / run / "eval" / "stability.json"
    if path.exists():
        return json.loads(path.read_text())
    if not n_items or not (root / run / "export" / "barnfast.json").exists() or not (root / "sweep.json").exists():
        return None
    if not (Path(json.loads((root / "sweep.json").read_text())["data_dir"]) / "eval_open.jsonl").exists():
        return None
    from barnfast.evaluation import ExportedVLM, load_items
    from barnfast.evaluation.evaluate import representation_stability

    data_dir = Path(json.loads((root / "sweep.json").read_text())["data_dir"])
    items = load_items(data_dir / "eval_open.jsonl", "synthetic", limit=n_items)
    result = representation_stability(ExportedVLM(root / run / "export"), items)
    path.write_text(json.dumps(result, indent=2))
    return result


# -- analyses -------------------------------------------------------------------------------------------


def _mean(xs) -> float | None:
    xs = list(xs)
    return float(np.mean(xs)) if xs else None


def accuracy_tables(records: dict[str, list[dict]]) -> dict:
    out = {}
    for b, rows in records.items():
        by_task = {t: _mean(r["correct"] for r in rows if r["task"] == t) for t in TASKS}
        cats = sorted({r["category"] for r in rows})
        by_cat = {c: _mean(r["correct"] for r in rows if r["category"] == c) for c in cats}
        yn = [r for r in rows if r["task"] == "yesno"]
        op = [r for r in rows if r["task"] == "open"]
        vqa = [r["vqa_accuracy"] for r in op if r.get("vqa_accuracy") is not None]
        out[b] = {
            "n": len(rows), "overall": _mean(r["correct"] for r in rows), "by_task": by_task,
            "n_by_task": {t: sum(r["task"] == t for r in rows) for t in TASKS}, "by_category": by_cat,
            "perception": _mean(r["correct"] for r in rows if r["category"] in PERCEPTION),
            "reasoning": _mean(r["correct"] for r in rows if r["category"] in REASONING),
            "pope": scores.pope_metrics([r["prediction"] for r in yn], [r["answer"] for r in yn]) if yn else None,
            "open_exact_match": _mean(r["correct"] for r in op), "open_vqa_accuracy": _mean(vqa),
        }
    return out


def correctness_matrix(backbones: list[str], records: dict[str, list[dict]]) -> tuple[list[str], np.ndarray]:
    """(item keys common to all backbones, (n_items, n_backbones) bool)."""
    maps = {b: {r["key"]: bool(r["correct"]) for r in records[b]} for b in backbones}
    keys = sorted(set.intersection(*(set(m) for m in maps.values())))
    matrix = np.array([[maps[b][k] for b in backbones] for k in keys], dtype=bool)
    return keys, matrix.reshape(len(keys), len(backbones))


def overlap(backbones: list[str], matrix: np.ndarray) -> list[dict]:
    pairs = []
    for i, j in itertools.combinations(range(len(backbones)), 2):
        table = scores.contingency(matrix[:, i], matrix[:, j])
        pairs.append({"old": backbones[i], "new": backbones[j], "table": table,
                      "mcnemar_p": scores.mcnemar_exact(table["n10"], table["n01"]),
                      "phi": scores.phi_coefficient(table), "gain": scores.gain_split(table)})
    return pairs


def calibration_tables(records: dict[str, list[dict]], n_bins: int) -> dict:
    out = {}
    for b, rows in records.items():
        closed = [r for r in rows if r["task"] in ("mc", "yesno")]
        op = [r for r in rows if r["task"] == "open"]
        entry = {}
        if closed:
            entry["closed"] = scores.calibration([r["confidence"] for r in closed], [r["correct"] for r in closed],
                                                  n_bins)
            probs = [list(r["option_probs"].values()) for r in closed]
            targets = [list(r["option_probs"]).index(r["answer"]) for r in closed]
            entry["closed"]["multiclass_brier"] = scores.multiclass_brier(probs, targets)
        if op:
            entry["open"] = scores.calibration([r["confidence"] for r in op], [r["correct"] for r in op], n_bins)
        out[b] = entry
    return out


def upset_counts(backbones: list[str], matrix: np.ndarray) -> list[dict]:
    """Items per exact set of backbones that solve them (UpSet intersections), largest first."""
    counts = Counter(tuple(bool(v) for v in row) for row in matrix)
    rows = [{"solved_by": [b for b, v in zip(backbones, sig) if v], "count": n} for sig, n in counts.items()]
    return sorted(rows, key=lambda r: (-r["count"], len(r["solved_by"])))


# -- figures --------------------------------------------------------------------------------------------


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k/n (well behaved at 0 and 1, unlike k/n ± z·se)."""
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def item_chance(rows: list[dict]) -> list[float]:
    """Per record, the accuracy of guessing without looking: 1/(number of options) for mc and yes/no;
    for open answers, the share of the same (task, category) items whose answer is the most frequent
    one (what a model that always gives that answer scores)."""
    groups: dict[tuple, Counter] = {}
    for r in rows:
        if not r.get("option_probs"):
            groups.setdefault((r["task"], r["category"]), Counter())[str(r["answer"]).lower()] += 1
    out = []
    for r in rows:
        if r.get("option_probs"):
            out.append(1.0 / len(r["option_probs"]))
        else:
            c = groups[(r["task"], r["category"])]
            out.append(c.most_common(1)[0][1] / sum(c.values()))
    return out


def accuracy_intervals(records: dict[str, list[dict]]) -> dict:
    """backbone → {"task"|"category": name → {"k", "n", "acc", "lo", "hi", "chance"}} (Wilson 95%)."""
    out = {}
    for b, rows in records.items():
        chance = item_chance(rows)
        entry = {}
        for kind in ("task", "category"):
            names = sorted({r[kind] for r in rows}, key=lambda x: (TASKS.index(x) if x in TASKS else 9, x))
            entry[kind] = {}
            for name in names:
                idx = [i for i, r in enumerate(rows) if r[kind] == name]
                k = int(sum(bool(rows[i]["correct"]) for i in idx))
                lo, hi = wilson_interval(k, len(idx))
                entry[kind][name] = {"k": k, "n": len(idx), "acc": k / len(idx), "lo": lo, "hi": hi,
                                     "chance": float(np.mean([chance[i] for i in idx]))}
        out[b] = entry
    return out


def fig_accuracy(intervals: dict, path: Path) -> None:
    """Accuracy per task and per category: one bar per backbone with its 95% Wilson interval, and a
    dashed chance line over each group."""
    backbones = list(intervals)
    kinds = ("task", "category")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, kind in zip(axes, kinds):
        names = list(intervals[backbones[0]][kind])
        width = 0.8 / len(backbones)
        for k, b in enumerate(backbones):
            cells = [intervals[b][kind].get(n) for n in names]
            vals = [c["acc"] if c else 0.0 for c in cells]
            err = np.array([[c["acc"] - c["lo"], c["hi"] - c["acc"]] if c else [0, 0] for c in cells]).T
            ax.bar(np.arange(len(names)) + k * width, vals, width, yerr=err, capsize=3, color=f"C{k}",
                   label=b, error_kw={"elinewidth": 1})
        for i, n in enumerate(names):
            ch = float(np.mean([intervals[b][kind][n]["chance"] for b in backbones if n in intervals[b][kind]]))
            ax.hlines(ch, i - width / 2 - 0.05, i + 0.8 - width / 2 + 0.05, colors="k", linestyles="--", lw=1.2,
                      label=CHANCE_LABEL if i == 0 else None)
        ax.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy")
        ax.set_title(f"accuracy per {kind} (bars: 95% Wilson interval)", fontsize=10)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablation_tables(records: dict[str, list[dict]]) -> dict:
    """backbone → task → accuracy with the item's own image, a blank image and another item's image
    (over the items that carry both controls), chance, and how often the answer changed."""
    out = {}
    for b, rows in records.items():
        chance = item_chance(rows)
        entry = {}
        for task in TASKS:
            idx = [i for i, r in enumerate(rows) if r["task"] == task and r.get("ablation")]
            kinds = [k for k in ("blank", "other") if idx and all(k in rows[i]["ablation"] for i in idx)]
            if not idx or not kinds:
                continue
            e = {"n": len(idx), "image": _mean(rows[i]["correct"] for i in idx),
                 "chance": float(np.mean([chance[i] for i in idx]))}
            for k in kinds:
                e[k] = _mean(rows[i]["ablation"][k]["correct"] for i in idx)
                e[f"changed_{k}"] = _mean(rows[i]["ablation"][k]["prediction"] != rows[i]["prediction"] for i in idx)
            e["distinct_predictions"] = len({str(rows[i]["prediction"]) for i in idx})
            entry[task] = e
        if entry:
            out[b] = entry
    return out


def fig_ablation(abl: dict, path: Path) -> None:
    """Per backbone and task: accuracy with the right image, a blank one and another item's image, and chance."""
    backbones = list(abl)
    fig, axes = plt.subplots(1, len(backbones), figsize=(4.6 * len(backbones), 3.8), squeeze=False)
    conds = [("image", "right image", "C2"), ("blank", "blank image", "C7"), ("other", "another item's image", "C1")]
    for ax, b in zip(axes[0], backbones):
        tasks = list(abl[b])
        width = 0.8 / len(conds)
        for k, (key, label, colour) in enumerate(conds):
            ax.bar(np.arange(len(tasks)) + k * width, [abl[b][t].get(key) or 0.0 for t in tasks], width,
                   color=colour, label=label)
        for i, t in enumerate(tasks):
            ax.hlines(abl[b][t]["chance"], i - width / 2 - 0.05, i + 0.8 - width / 2 + 0.05, colors="k",
                      linestyles="--", lw=1.2, label=CHANCE_LABEL if i == 0 else None)
        ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, [f"{t}\n(n={abl[b][t]['n']})" for t in tasks])
        ax.set_ylim(0, 1.05)
        ax.set_title(b, fontsize=10)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper right")
    fig.suptitle("image-ablation control: the same questions with and without the right image", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_upset(backbones: list[str], rows: list[dict], path: Path) -> None:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.5, 0.7 * len(rows) + 2), 4.5), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    x = np.arange(len(rows))
    top.bar(x, [r["count"] for r in rows], color="#444")
    for xi, r in zip(x, rows):
        top.text(xi, r["count"], str(r["count"]), ha="center", va="bottom", fontsize=8)
    top.set_ylabel("items")
    top.set_title("items by the set of backbones that solve them (UpSet)", fontsize=10)
    for yi, b in enumerate(backbones):
        on = [b in r["solved_by"] for r in rows]
        bottom.scatter(x, [yi] * len(rows), c=["#222" if o else "#ddd" for o in on], s=60)
    bottom.set_yticks(range(len(backbones)), backbones)
    bottom.set_xticks(x, [""] * len(rows))
    bottom.set_ylim(-0.5, len(backbones) - 0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_reliability(cal: dict, path: Path) -> None:
    backbones = [b for b in cal if "closed" in cal[b]]
    fig, axes = plt.subplots(1, len(backbones), figsize=(3.6 * len(backbones), 3.6), squeeze=False)
    for ax, b in zip(axes[0], backbones):
        c = cal[b]["closed"]
        w = 1 / c["n_bins"]
        filled = [r for r in c["bins"] if r["count"]]
        ax.bar([r["lo"] for r in filled], [r["accuracy"] for r in filled], width=w, align="edge",
               edgecolor="k", label="accuracy")
        ax.bar([r["lo"] for r in filled], [r["confidence"] - r["accuracy"] for r in filled], width=w,
               bottom=[r["accuracy"] for r in filled], align="edge", color="red", alpha=0.3,
               label="gap to mean confidence")
        for r in filled:  # per-bin item count, so a bin of 2 items is not read like one of 200
            ax.text(r["lo"] + w / 2, max(r["accuracy"], r["confidence"]) + 0.01, str(r["count"]), ha="center",
                    va="bottom", fontsize=6)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("confidence (numbers: items per bin)")
        ax.set_title(f"{b}\nECE {c['ece']:.3f}  MCE {c['mce']:.3f}", fontsize=9)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fig_cka(stab: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.8))
    # colour = backbone, line style and marker = perturbation: every curve differs in two ways
    styles = {"noise": ("-", "o"), "shift": ("--", "s")}
    n_layers = 0
    for k, (b, s) in enumerate(stab.items()):
        for kind, curve in s["cka"].items():
            ls, marker = styles.get(kind, (":", "^"))
            ax.plot(range(len(curve)), curve, ls, color=f"C{k}", marker=marker, ms=4, label=f"{b}, {kind}")
            n_layers = max(n_layers, len(curve))
    ax.set_xticks(range(n_layers))  # layers are integers: no 0.5 ticks
    ax.set_xlabel("decoder layer (0 = embeddings)")
    ax.set_ylabel("linear CKA, clean vs perturbed")
    ax.set_title("representation stability")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- control, statistics, seeds and the training side ---------------------------------------------------


def load_control(root: Path) -> dict | None:
    """``control.json`` as ``barnfast sweep`` wrote it after training (None when missing)."""
    path = root / "control.json"
    return json.loads(path.read_text()) if path.exists() else None


def _short(x, n: int = 12) -> str:
    return "n/a" if x is None else str(x)[:n]


def render_control(control: dict | None) -> list[str]:
    md = ["## 0. Control: same samples, same order, same vision features", ""]
    if control is None:
        return md + ["**controlled: unknown**: no `control.json` (`barnfast sweep` writes it after training).", ""]
    if control["controlled"]:
        md.append("**controlled: yes**: for every seed, every backbone trained on the same sample ids in the same "
                  "optimizer steps, with the same vision tower weights and every other fingerprint field equal; "
                  "only the backbone differs.")
    else:
        md += [f"**controlled: NO**: {len(control['differences'])} difference(s):", "",
               _table(["seed", "runs", "what differs", "first run", "other run"],
                      [[d["seed"], " vs ".join(d["runs"]), d["what"], json.dumps(d["old"])[:80],
                        json.dumps(d["new"])[:80]] for d in control["differences"]])]
    stages = sorted({st for r in control["runs"].values() for st in r["manifests"]})
    rows = []
    for name, r in control["runs"].items():
        row = [name, r["seed"], _short(r["fingerprint"]), _short(r["vision_identity"], 48)]
        for st in stages:
            m = r["manifests"].get(st, {})
            row += [f"{_short(m.get('sha256'))} ({m.get('num_steps')} steps, {m.get('num_samples')} samples, "
                    f"{m.get('num_skipped')} skipped, {m.get('num_excluded')} excluded)"]
        rows.append(row)
    md += ["", _table(["run", "seed", "fingerprint", "vision weights", *[f"{st} manifest" for st in stages]], rows),
           ""]
    ex = control.get("excluded_samples") or []
    md.append(f"Samples dropped for every backbone because some backbone could not take them: {len(ex)}"
              + ("" if not ex else " (" + "; ".join(f"{e['stage']}/{e['id']}: {e['reason']}" for e in ex[:5])
                 + (" ..." if len(ex) > 5 else "") + ")") + ".")
    md += ["", f"How computed: {control['how']}.", ""]
    return md


def statistics(backbones: list[str], records: dict[str, list[dict]]) -> dict:
    """Per evaluation file: accuracy with a bootstrap 95% CI, chance, warnings; every pair's difference
    with its paired bootstrap CI, exact McNemar p and the discordant split with its Clopper-Pearson CI."""
    benches = sorted({r["benchmark"] for rows in records.values() for r in rows})
    out = {}
    for bench in benches:
        per = {b: {r["key"]: r for r in records[b] if r["benchmark"] == bench} for b in backbones}
        keys = sorted(set.intersection(*(set(m) for m in per.values())))
        if not keys:
            continue
        chance = scores.chance_accuracy([per[backbones[0]][k] for k in keys])
        models = {}
        for b in backbones:
            rows = [per[b][k] for k in keys]
            correct = [float(r["correct"]) for r in rows]
            ci = scores.bootstrap_ci(correct)
            models[b] = {"accuracy": float(np.mean(correct)), "ci": ci,
                         "warnings": scores.answer_warnings(rows, ci, chance)}
        pairs = []
        for a, b in itertools.combinations(backbones, 2):
            x = [float(per[a][k]["correct"]) for k in keys]
            y = [float(per[b][k]["correct"]) for k in keys]
            t = scores.contingency(x, y)
            pairs.append({"old": a, "new": b, "diff": scores.paired_bootstrap_diff(x, y), "table": t,
                          "split": scores.discordant_split(t["n10"], t["n01"])})
        out[bench] = {"n": len(keys), "chance": chance, "models": models, "pairs": pairs}
    return out


def official_scores(root: Path) -> dict:
    """Run → evaluation file → the benchmark's own headline numbers (``benchmark`` in eval/<name>.summary.json)."""
    out = {}
    for run in sweep_runs(root):
        for path in sorted((root / run["name"] / "eval").glob("*.summary.json")):
            bench = json.loads(path.read_text()).get("benchmark")
            if bench:
                out.setdefault(run["name"], {})[path.name.removesuffix(".summary.json")] = bench
    return out


_HEADLINE_SCORE = {"mme": ("perception", "cognition"), "mmbench": ("circular_accuracy", "first_rotation_accuracy"),
                   "textvqa": ("vqa_accuracy",)}


def render_official(off: dict) -> list[str]:
    rows = []
    for run, benches in off.items():
        for name, b in benches.items():
            keys = _HEADLINE_SCORE.get(b["format"], ("accuracy",))
            vals = "; ".join(f"{k} {b[k]:.3f}" for k in keys)
            if b["format"] == "pope":
                vals += f"; F1 {b['pope']['f1']:.3f}; yes-ratio {b['pope']['yes_ratio']:.3f}"
            rows.append([run, name, b["format"], vals])
    if not rows:
        return []
    return ["### Benchmark scores (each benchmark's own metric)", "", _table(["run", "file", "format", "scores"], rows),
            "", "How computed: MME perception / cognition = Σ over subtasks of 100·(acc + acc+), acc+ = share of "
            "images with both questions right; MMBench circular accuracy = share of questions right in every "
            "rotation of their options; TextVQA = mean VQA accuracy (official answer normalisation); POPE F1 with "
            "\"yes\" positive; others: accuracy.", ""]


def render_statistics(st: dict) -> list[str]:
    md = ["## Statistics per evaluation file", ""]
    for bench, s in st.items():
        md += [f"### {bench} (n={s['n']}, chance {_f(s['chance'])})", "",
               _table(["backbone", "accuracy", "95% CI", "warning"],
                      [[b, m["accuracy"], f"[{m['ci'][0]:.3f}, {m['ci'][1]:.3f}]",
                        "; ".join(f"⚠ {w}" for w in m["warnings"]) or "-"] for b, m in s["models"].items()]), ""]
        if s["pairs"]:
            md += [_table(["old → new", "Δ accuracy", "95% CI of Δ", "McNemar p", "discordant", "new's share",
                           "95% CI of share"],
                          [[f"{p['old']} → {p['new']}", p["diff"]["diff"], f"[{p['diff']['lo']:.3f}, "
                            f"{p['diff']['hi']:.3f}]", p["split"]["mcnemar_p"], p["split"]["n_discordant"],
                            p["split"]["new_share"], f"[{p['split']['lo']:.3f}, {p['split']['hi']:.3f}]"]
                           for p in s["pairs"]]), ""]
    md += ["How computed: 95% CI of an accuracy = percentile bootstrap over items (2,000 resamples, seed 0); "
           "chance = mean over items of 1/(number of options) (n/a for open answers); Δ = new − old accuracy on "
           "the same items, its CI from resampling the items jointly; McNemar p = exact two-sided binomial test "
           "on the discordant items; new's share = of the items exactly one model solves, the share the new one "
           "solves, with its Clopper-Pearson 95% interval (0.5 inside = no evidence either solves more of them). "
           "⚠ marks a model whose answers are all the same or whose accuracy CI contains chance: its overlap "
           "numbers (phi, more/different) are noise.", ""]
    return md


def seed_analysis(root: Path) -> dict | None:
    """With several seeds: mean ± std of accuracy per backbone and file, and the seed-vs-seed overlap of each
    backbone as the reference for backbone-vs-backbone overlap (None with one seed)."""
    runs = sweep_runs(root)
    seeds = list(dict.fromkeys(r["seed"] for r in runs))
    if len(seeds) < 2:
        return None
    recs = {r["name"]: {x["key"]: x for x in load_records(root / r["name"])} for r in runs}
    backbones = list(dict.fromkeys(r["backbone"] for r in runs))
    name = {(r["backbone"], r["seed"]): r["name"] for r in runs}
    benches = sorted({x["benchmark"] for m in recs.values() for x in m.values()})

    def discord(n1: str, n2: str) -> dict:
        keys = sorted(set(recs[n1]) & set(recs[n2]))
        t = scores.contingency([recs[n1][k]["correct"] for k in keys], [recs[n2][k]["correct"] for k in keys])
        return {"n": len(keys), "discordant_share": (t["n10"] + t["n01"]) / max(len(keys), 1),
                "phi": scores.phi_coefficient(t), "table": t}

    accuracy = {}
    for b in backbones:
        accuracy[b] = {}
        for bench in [*benches, "overall"]:
            vals = [float(np.mean([x["correct"] for x in recs[name[b, s]].values()
                                   if bench == "overall" or x["benchmark"] == bench])) for s in seeds]
            mean, std = scores.mean_std(vals)
            accuracy[b][bench] = {"mean": mean, "std": std, "per_seed": vals}
    seed_ref = {b: discord(name[b, seeds[0]], name[b, seeds[1]]) for b in backbones}
    pairs = []
    for a, b in itertools.combinations(backbones, 2):
        per_seed = [discord(name[a, s], name[b, s]) for s in seeds]
        share = float(np.mean([p["discordant_share"] for p in per_seed]))
        ref = max(seed_ref[a]["discordant_share"], seed_ref[b]["discordant_share"])
        pairs.append({"old": a, "new": b, "discordant_share": share, "seed_reference": ref,
                      "phi": float(np.nanmean([p["phi"] for p in per_seed])) if any(
                          not math.isnan(p["phi"]) for p in per_seed) else math.nan,
                      "differ_more_than_seeds": share > ref})
    return {"seeds": seeds, "benchmarks": benches, "accuracy": accuracy, "seed_reference": seed_ref, "pairs": pairs}


def render_seeds(sd: dict | None) -> list[str]:
    if sd is None:
        return ["## Seeds", "", "One seed only: no seed-vs-seed reference; differences between backbones cannot be "
                "told apart from seed noise (train with `--seeds 0,1,2`).", ""]
    cols = [*sd["benchmarks"], "overall"]
    md = [f"## Seeds ({', '.join(map(str, sd['seeds']))}): mean ± std", "",
          _table(["backbone", *cols],
                 [[b, *[f"{a[c]['mean']:.3f} ± {_f(a[c]['std'])}" for c in cols]] for b, a in sd["accuracy"].items()]),
          "", "### Seed-vs-seed reference", "",
          _table(["backbone", f"seed {sd['seeds'][0]} vs {sd['seeds'][1]}: items", "discordant share", "phi"],
                 [[b, r["n"], r["discordant_share"], r["phi"]] for b, r in sd["seed_reference"].items()]), "",
          _table(["old → new", "discordant share (mean over seeds)", "seed reference (larger of the two)",
                  "phi (mean)", "verdict"],
                 [[f"{p['old']} → {p['new']}", p["discordant_share"], p["seed_reference"], p["phi"],
                   "backbones differ more than seeds do" if p["differ_more_than_seeds"] else
                   "within seed noise: no claim of 'different questions'"] for p in sd["pairs"]]), "",
          "How computed: std = sample standard deviation over seeds (ddof 1); discordant share = share of items "
          "exactly one of two runs solves; the seed reference is that share between two seeds of one backbone "
          "(same data, same recipe, another seed), the larger of the pair's two backbones; \"solves different "
          "questions\" is claimed only where backbones disagree on more items than seeds of one backbone do.", ""]
    return md


def training_side(root: Path) -> dict:
    """Per run and stage: steps, first/last loss, loss in bits per byte of target text, samples/s, tokens/s,
    skipped and excluded samples; and which registry variant (base / chat / instruct) the backbone is."""
    from barnfast.models import backbones as registry

    out = {}
    for run in sweep_runs(root):
        run_dir = root / run["name"]
        path = run_dir / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        try:
            entry = registry.from_name(run["backbone"])
            variant, hf_id = getattr(entry, "variant", None), entry.hf_id
        except ValueError:
            variant, hf_id = None, None
        stages = {}
        for st in dict.fromkeys(r["stage"] for r in rows):
            sr = [r for r in rows if r["stage"] == st]
            bpb = [r.get("loss_bits_per_byte") for r in sr]
            skipped = run_dir / st / "skipped_samples.jsonl"
            manifest = run_dir / st / "manifest.json"
            stages[st] = {
                "steps": len(sr), "loss_first": sr[0]["loss"], "loss_last": sr[-1]["loss"],
                "bpb_first": bpb[0], "bpb_last": bpb[-1], "bpb_curve": bpb,
                "samples_per_s": _mean(r["samples_per_s"] for r in sr),
                "tokens_per_s": _mean(r["tokens_per_s"] for r in sr),
                "skipped": len(skipped.read_text().splitlines()) if skipped.exists() else None,
                "excluded": json.loads(manifest.read_text()).get("num_excluded") if manifest.exists() else None}
        out[run["name"]] = {"backbone": run["backbone"], "seed": run["seed"], "variant": variant, "hf_id": hf_id,
                            "stages": stages}
    return out


def fig_training(tr: dict, path: Path) -> None:
    stages = sorted({st for r in tr.values() for st in r["stages"]})
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(5 * max(1, len(stages)), 3.6), squeeze=False)
    for ax, st in zip(axes[0], stages):
        for k, (name, r) in enumerate(tr.items()):
            curve = r["stages"].get(st, {}).get("bpb_curve") or []
            if curve and all(v is not None for v in curve):
                ax.plot(range(len(curve)), curve, color=f"C{k}", marker="o", ms=3, label=name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss, bits per byte of target text")
        ax.set_title(st)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_training(tr: dict) -> list[str]:
    rows = []
    for name, r in tr.items():
        for st, s in r["stages"].items():
            rows.append([name, r["variant"] or "n/a", st, s["steps"], s["loss_first"], s["loss_last"], s["bpb_first"],
                         s["bpb_last"], s["samples_per_s"], s["tokens_per_s"], s["skipped"], s["excluded"]])
    return ["## Training side", "",
            _table(["run", "variant", "stage", "steps", "loss first", "loss last", "bits/byte first",
                    "bits/byte last", "samples/s", "tokens/s", "skipped", "excluded"], rows), "",
            "![training](figures/training_bpb.png)", "",
            "How computed: loss = mean cross-entropy in nats per target token (not comparable across 32k and 128k "
            "vocabularies); bits per byte = loss × target tokens / (ln 2 × UTF-8 bytes of the target text) per "
            "step, comparable across tokenizers; samples/s and tokens/s = means over the logged steps; skipped = "
            "lines of <stage>/skipped_samples.jsonl (bad input); excluded = samples the sweep dropped for every "
            "backbone; variant = the registry entry's base / chat / instruct.", ""]


# -- report ---------------------------------------------------------------------------------------------


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def headline(backbones, acc, cal, stab) -> str:
    rows = []
    for b in backbones:
        a, c = acc[b], cal[b].get("closed", {})
        s = stab.get(b)
        rows.append([b, a["overall"], a["by_task"]["open"], a["by_task"]["mc"], a["by_task"]["yesno"],
                     (a["pope"] or {}).get("f1"), a["perception"], a["reasoning"], c.get("ece"), c.get("brier"),
                     float(np.mean(s["cka"]["noise"])) if s and "noise" in s["cka"] else None])
    return _table(["backbone", "overall acc", "open EM", "mc acc", "yes/no acc", "POPE F1", "perception",
                   "reasoning", "ECE (mc+yn)", "Brier (mc+yn)", "mean CKA (noise)"], rows)


def build_report(root: Path, bins: int = 15, stability_items: int = 16) -> dict:
    backbones, records = load_sweep(root)
    figdir = root / "figures"
    figdir.mkdir(exist_ok=True)
    acc = accuracy_tables(records)
    keys, matrix = correctness_matrix(backbones, records)
    pairs = overlap(backbones, matrix)
    upset = upset_counts(backbones, matrix)
    cal = calibration_tables(records, bins)
    stab = {b: s for b in backbones if (s := load_stability(root, b, stability_items)) is not None}
    intervals = accuracy_intervals(records)
    abl = ablation_tables(records)
    fig_accuracy(intervals, figdir / "accuracy.png")
    if abl:
        fig_ablation(abl, figdir / "ablation.png")
    fig_upset(backbones, upset, figdir / "overlap_upset.png")
    fig_reliability(cal, figdir / "reliability.png")
    if stab:
        fig_cka(stab, figdir / "cka_stability.png")
    fig_training(training_side(root), figdir / "training_bpb.png")
    result = {"backbones": backbones, "n_common_items": len(keys), "accuracy": acc,
              "accuracy_intervals": intervals, "ablation": abl, "overlap": pairs,
              "upset": upset, "calibration": cal, "stability": stab,
              "figures": sorted(str(p.relative_to(root)) for p in figdir.glob("*.png"))}
    result["control"] = load_control(root)
    result["statistics"] = statistics(backbones, records)
    result["seeds"] = seed_analysis(root)
    result["training"] = training_side(root)
    result["benchmark_scores"] = official_scores(root)
    sweep = json.loads((root / "sweep.json").read_text()) if (root / "sweep.json").exists() else {}
    (root / "analysis.json").write_text(json.dumps(result, indent=2))
    (root / "report.md").write_text(render(root, backbones, result, sweep))
    return result


def header_line(root: Path, sweep: dict) -> str:
    """The report's first line, with words where a setting was left at its default (never "None")."""
    recipe = sweep.get("recipe") or "barnfast.train's default (llava15-tiny for -tiny backbones, else llava15)"
    steps = sweep.get("max_steps")
    steps = f"at most {steps} optimizer steps per stage" if steps is not None else "every stage run to its last epoch"
    seeds = sweep.get("seeds") or ([sweep["seed"]] if sweep.get("seed") is not None else [])
    seed = ", ".join(map(str, seeds)) + (" (sections 1-4: the first seed)" if len(seeds) > 1 else "")
    overrides = ", ".join(f"`{x}`" for x in sweep.get("set") or []) or "none"
    return (f"Sweep: `{root}`; seed(s) {seed or 'not recorded'}, recipe {recipe}, {steps}, "
            f"recipe overrides: {overrides}; every backbone trained and evaluated on the same data. "
            "All numbers are in `analysis.json`.")


def ablation_section(abl: dict) -> list[str]:
    """Report lines of the image-ablation control (empty when the records carry none)."""
    if not abl:
        return []
    rows = [[b, t, e["n"], e["image"], e.get("blank"), e.get("other"), e["chance"], e.get("changed_other"),
             e["distinct_predictions"]] for b, tasks in abl.items() for t, e in tasks.items()]
    return ["### With and without the right image (image-ablation control)", "",
            _table(["backbone", "task", "items", "right image", "blank image", "another item's image", "chance",
                    "answer changed (other image)", "distinct answers"], rows), "",
            "How computed: every item is answered three times, with its own image, with a blank (white) image and "
            "with the image of the item half the file away; accuracy over the same items in each column. A model "
            "that reads the image is far above chance with the right image and near chance without it; a visual "
            "path that is broken (features of the wrong image, tokens merged at the wrong place) shows as equal "
            "columns. \"answer changed\" = share of items whose prediction differs between the right and the "
            "other image.", "", "![ablation](figures/ablation.png)", ""]


def render(root: Path, backbones: list[str], r: dict, sweep: dict) -> str:
    acc, cal, stab = r["accuracy"], r["calibration"], r["stability"]
    cats = sorted({c for a in acc.values() for c in a["by_category"]})
    md = [f"# Backbone sweep report: {', '.join(backbones)}", "", *render_control(r["control"]),
          header_line(root, sweep), "",
          "## Headline", "", headline(backbones, acc, cal, stab), "",
          "How computed: accuracy = share of items answered correctly (mc: the option letter whose first answer "
          "token is the most likely, as lmms-eval reads the generated letter, so an option's token count cannot "
          "matter; yes/no: the more likely of yes/Yes vs no/No, first token likewise; open: normalised exact match "
          "of the greedy answer); perception = "
          "colour + shape items, reasoning = count + position items, over all tasks; POPE F1 with \"yes\" the "
          "positive class; ECE over 15 equal-width confidence bins and top-label Brier over the mc and yes/no "
          "items; mean CKA = linear CKA of clean vs noisy-image hidden states averaged over layers.", "",
          *render_statistics(r["statistics"]), *render_official(r["benchmark_scores"]), *render_seeds(r["seeds"]),
          *render_training(r["training"]),
          "## 1. Accuracy", "", "### Per task", "",
          _table(["backbone", *[f"{t} (n={acc[backbones[0]]['n_by_task'][t]})" for t in TASKS], "overall",
                  "open VQA acc"],
                 [[b, *[acc[b]["by_task"][t] for t in TASKS], acc[b]["overall"], acc[b]["open_vqa_accuracy"]]
                  for b in backbones]), "",
          "How computed: mean of per-item correctness per task; open VQA accuracy = the 10-annotator VQA "
          "accuracy (min(1, matches/3) averaged over the 10 leave-one-out annotator subsets) of the greedy answer.",
          "", "### Per category (perception vs reasoning)", "",
          _table(["backbone", *cats, "perception (colour+shape)", "reasoning (count+position)"],
                 [[b, *[acc[b]["by_category"].get(c) for c in cats], acc[b]["perception"], acc[b]["reasoning"]]
                  for b in backbones]), "",
          "How computed: mean correctness over the items of each category, all three tasks pooled.", "",
          "### POPE metrics (yes/no items)", "",
          _table(["backbone", "accuracy", "precision", "recall", "F1", "yes-ratio"],
                 [[b, *[(acc[b]["pope"] or {}).get(k) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")]]
                  for b in backbones]), "",
          "How computed: \"yes\" is the positive class; precision = TP/(TP+FP), recall = TP/(TP+FN), "
          "F1 their harmonic mean, yes-ratio = share of \"yes\" predictions.", "",
          "![accuracy](figures/accuracy.png)", "",
          "Bars: 95% Wilson score intervals; dashed lines: chance (mc and yes/no: 1/number of options; open: "
          "the share of items whose answer is the most frequent one of their category).", "",
          *ablation_section(r.get("ablation") or {}),
          "## 2. Overlap: more or different questions?", "",
          f"Over the {r['n_common_items']} items every backbone answered (all tasks), for each pair in sweep "
          "order (old → new).", "",
          _table(["old → new", "both right", "old only", "new only", "both wrong", "McNemar p", "phi",
                  "more", "different", "net gain"],
                 [[f"{p['old']} → {p['new']}", p["table"]["n11"], p["table"]["n10"], p["table"]["n01"],
                   p["table"]["n00"], p["mcnemar_p"], p["phi"], p["gain"]["more"], p["gain"]["different"],
                   p["gain"]["net"]] for p in r["overlap"]]), "",
          "How computed: the 2x2 table counts items by (old right?, new right?); McNemar p = two-sided exact "
          "binomial test on the discordant counts, min(1, 2·P[Bin(b+c, ½) ≤ min(b, c)]); phi = Pearson "
          "correlation of the two 0/1 correctness vectors (n/a when a model is right on all or none); "
          "more = items solved by the new model and not the old, different = items solved by the old and "
          "lost by the new, net gain = more − different.", "",
          "![overlap](figures/overlap_upset.png)", "",
          _table(["solved by", "items"], [[" + ".join(u["solved_by"]) or "(none)", u["count"]] for u in r["upset"]]),
          "", "## 3. Calibration", "",
          _table(["backbone", "items", "ECE", "MCE", "Brier (top-label)", "Brier (multi-class)", "open ECE",
                  "open Brier"],
                 [[b, cal[b].get("closed", {}).get("n"), cal[b].get("closed", {}).get("ece"),
                   cal[b].get("closed", {}).get("mce"), cal[b].get("closed", {}).get("brier"),
                   cal[b].get("closed", {}).get("multiclass_brier"), cal[b].get("open", {}).get("ece"),
                   cal[b].get("open", {}).get("brier")] for b in backbones]), "",
          "How computed: over the mc and yes/no items, confidence = softmax probability of the chosen option "
          "(over the options' first-answer-token log-probabilities); 15 equal-width bins (b/15, (b+1)/15]; "
          "ECE = Σ_bins (n_bin/N)·|accuracy − mean confidence|, MCE = the largest bin gap; top-label Brier = "
          "mean (confidence − correct)²; multi-class Brier = mean Σ_options (p − 1[option is right])². Open "
          "answers: confidence = geometric mean of the greedy tokens' probabilities (stop token included).", "",
          "![reliability](figures/reliability.png)", "", "## 4. Representation stability", ""]
    if stab:
        n_layers = max(len(c) for s in stab.values() for c in s["cka"].values())
        md += [_table(["backbone", "perturbation", *[f"L{i}" for i in range(n_layers)], "mean"],
                      [[b, kind, *curve, float(np.mean(curve))] for b, s in stab.items() for kind, curve in
                       s["cka"].items()]), "",
               f"How computed: {next(iter(stab.values()))['method']}; {next(iter(stab.values()))['n_items']} "
               "open-answer items; noise = Gaussian, std 0.03 in [0, 1] pixel units; shift = image moved one "
               "pixel right. 1 = the perturbation leaves the representation unchanged up to rotation and scale.",
               "", "![cka](figures/cka_stability.png)", ""]
    else:
        md += ["Not computed (no stability.json and no export to compute it from).", ""]
    return "\n".join(md)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m barnfast.evaluation.analyze", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep_dir", help="output directory of barnfast.sweep")
    p.add_argument("--bins", type=int, default=15, help="calibration bins (equal width)")
    p.add_argument("--stability-items", type=int, default=16, help="items for missing CKA curves (0: skip)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = Path(args.sweep_dir)
    result = build_report(root, args.bins, args.stability_items)
    print(headline(result["backbones"], result["accuracy"], result["calibration"], result["stability"]))
    print(f"report: {root / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
