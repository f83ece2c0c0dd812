"""AMD's audit (:mod:`kdbench.tasearch` runs the search): the selection next to the oracle.

Per candidate of the search, its scale, size, joint val accuracy and the rule's slope, next to what the oracle
measured: each candidate distilled into each student on the same seeds (paired by seed). From those runs:

* per candidate, the oracle's mean and 95% t-interval over seeds;
* a best candidate only when it is *separable*: its paired 95% interval against every other candidate lies
  above 0 (an intersection-union test: each comparison at 5% and all must hold, so the verdict is a level-5%
  test without a multiplicity correction); otherwise the audit says "not separable", names no best and lists
  the candidates the leader cannot be told from;
* Spearman's rank correlation between the rule's preference and the oracle's means, with a 95% percentile
  interval from resampling the seeds;
* the pick's stability (:func:`kdbench.tasearch.pick_stability`): stable when at least :data:`STABLE_SHARE`
  of the noisy re-selections keep it.
"""

from __future__ import annotations

import numpy as np

from kdbench.report.stats import paired_delta, spearman, summarize

STABLE_SHARE = 0.8
"""The share of noisy re-selections that must keep the pick for it to count as stable (OUR CHOICE)."""
BOOTSTRAP_DRAWS = 2000


def stable(share: float) -> bool:
    """Whether a pick kept in ``share`` of the noisy re-selections is stable."""
    return share >= STABLE_SHARE


def oracle_verdict(val: list[list[float]], selected: int, preference: list[float], seed: int = 0) -> dict:
    """The oracle's verdict from every candidate's runs on the same seeds (``val[k][i]``: candidate k, seed i).

    * Per candidate: the mean and 95% t-interval over seeds (:func:`kdbench.report.stats.summarize`).
    * The best by mean is named only if it is *separable*: its paired 95% interval against every other
      candidate (differences by seed, :func:`kdbench.report.stats.paired_delta`) lies above 0 — an
      intersection-union test, level 5% without a multiplicity correction. Otherwise ``best`` is ``None`` and
      ``top`` lists the candidates the best is not separable from (itself included).
    * Spearman between the rule's preference and the oracle's mean order, with a 95% percentile interval from
      resampling seeds (the same seeds for every candidate, ``BOOTSTRAP_DRAWS`` draws).
    * The selection's regret: the leader's mean minus the selected candidate's, with its paired interval.
    """
    m, n = len(val), len(val[0])
    by_seed = [dict(enumerate(v)) for v in val]
    summaries = [summarize(v) for v in val]
    means = [s.mean for s in summaries]
    lead = max(range(m), key=lambda k: (means[k], -k))
    deltas = {k: paired_delta(by_seed[lead], by_seed[k]) for k in range(m) if k != lead}
    top = sorted([lead, *(k for k, d in deltas.items() if d.diff.low is None or d.diff.low <= 0)])
    separable = len(top) == 1
    regret = deltas.get(selected)
    rho = spearman(preference, means)
    boot = []
    if n >= 2:
        rng = np.random.default_rng(seed)
        arr = np.asarray(val, dtype=np.float64)
        for idx in rng.integers(0, n, size=(BOOTSTRAP_DRAWS, n)):
            r = spearman(preference, arr[:, idx].mean(axis=1).tolist())
            if r is not None:
                boot.append(r)
    interval = [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))] if boot else None
    return {
        "seeds": n,
        "mean": means,
        "ci95": [s.ci95 for s in summaries],
        "leader": lead,
        "best": lead if separable else None,
        "top": top,
        "separable": separable,
        "selected_in_top": selected in top,
        "regret": means[lead] - means[selected],
        "regret_ci95": regret.diff.ci95 if regret else None,
        "spearman": rho,
        "spearman_ci95": interval,
        "selected_rank": sorted(range(m), key=lambda k: (-means[k], k)).index(selected) + 1,
    }


def audit(summary: dict, sel: dict, oracle: dict[str, list[dict]]) -> dict:
    """The selection next to the oracle, per student.

    Args:
        summary: The search's ``candidates.json``.
        sel: Its ``selection.json``.
        oracle: Student -> the oracle run records, candidate-major (candidate 0's seeds, then candidate 1's, ...),
            the same seeds in the same order for every candidate. Empty: no oracle (``oracle_seeds: 0``).

    Returns:
        ``{"criterion", "selected", "candidates", "slopes", "mean_slope", "teacher", ..., "stability": the
        pick's (:func:`pick_stability`, ``None`` for a search that did not log its val size), "students":
        {student: {"val_top1": [[per seed] per candidate], "test_top1": [...], "seed_ids": [...],
        **oracle_verdict}}}``.
    """
    m = len(summary["candidates"])
    preference = [0.0] * m
    for position, k in enumerate(sel["rank"]):
        preference[k] = float(m - position)  # higher = preferred by the rule
    students = {}
    for student, records in oracle.items():
        if not records or len(records) % m:
            raise ValueError(f"oracle of {student}: {len(records)} records is not a multiple of {m} candidates")
        n = len(records) // m
        runs = [records[k * n : (k + 1) * n] for k in range(m)]  # per candidate, its seeds in order
        seeds = [[run["identity"]["seed"] for run in group] for group in runs]
        if any(s != seeds[0] for s in seeds) or len(set(seeds[0])) != n:
            raise ValueError(f"oracle of {student}: every candidate needs the same {n} distinct seeds in the same"
                             f" order, got {seeds}")
        val = [[run["final"]["val_top1"] for run in group] for group in runs]
        students[student] = {
            "val_top1": val,
            "test_top1": [[run["final"]["test_top1"] for run in group] for group in runs],
            "seed_ids": seeds[0],
            **oracle_verdict(val, sel["selected"], preference),
        }
    stability = sel.get("stability")
    return {
        "criterion": sel["criterion"],
        "selected": sel["selected"],
        "candidates": summary["candidates"],
        "slopes": sel["slopes"],
        "mean_slope": sel["mean_slope"],
        "stability": {**stability, "stable": stable(stability["share"])} if stability else None,
        "teacher": summary["teacher"],
        "teacher_params": summary["teacher_params"],
        "teacher_val_top1": summary["teacher_val_top1"],
        "search_time_s": summary["wall_time_s"],
        "students": students,
    }


def audit_markdown(result: dict) -> str:
    """The audit as a Markdown table: one row per candidate, one oracle column per student (mean ± 95% interval
    over its seeds), then the verdicts in words."""
    students = list(result["students"])
    head = [
        "candidate",
        "scale",
        "params (ratio)",
        "joint val top-1",
        f"{result['criterion']} slope",
        *(f"oracle {s} val top-1 ({result['students'][s]['seeds']} seeds)" for s in students),
    ]
    lines = [
        (
            f"# AMD search audit: {result['teacher']} ({result['teacher_params']:,} params, val top-1"
            f" {result['teacher_val_top1']:.2f}%)"
        ),
        "",
        (
            f"Selection: `{result['criterion']}` (methods.md §1.3; the paper's exact NPSD was not found). Grid average slope"
            f" {result['mean_slope']:.2f} points per unit of scale; the rule picks the smallest candidate whose"
            f" slope from the next larger one is at most that. Search wall time {result['search_time_s']:.0f} s."
        ),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for k, c in enumerate(result["candidates"]):
        mark = " **(selected)**" if k == result["selected"] else ""
        cells = [
            f"{k}: `{c['name']}`{mark}",
            f"{c['scale']:.2f}",
            f"{c['params']:,} ({c['ratio']:.3f})",
            f"{c['val_top1']:.2f}",
            f"{result['slopes'][k]:.2f}",
        ]
        for s in students:
            st = result["students"][s]
            ci = st["ci95"][k]
            cell = f"{st['mean'][k]:.2f}" + (f" ± {ci:.2f}" if ci is not None else "")
            if k == st["best"]:
                cell += " (best)"
            elif st["best"] is None and k in st["top"]:
                cell += " (top, not separable)"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *_stability_lines(result)]
    for s, st in result["students"].items():
        lines.append(_verdict_line(s, st, result))
    if not students:
        lines.append("- No oracle runs (`oracle_seeds: 0`): the audit has the search's numbers and the pick's stability.")
    return "\n".join(lines) + "\n"


def _stability_lines(result: dict) -> list[str]:
    st = result.get("stability")
    if not st:
        return ["- Stability of the pick: not measured (the search did not log its val size)."]
    word = "stable" if st["stable"] else "**not stable**"
    return [
        f"- Stability of the pick: `{result['criterion']}` re-applied to the joint val accuracies redrawn within their"
        f" evaluation noise ({st['val_images']:,} val images, {st['draws']:,} draws) keeps candidate"
        f" {result['selected']} in {100 * st['share']:.0f}% of them: {word} (threshold {100 * STABLE_SHARE:.0f}%;"
        f" picks per candidate {st['picks']})."
    ]


def _verdict_line(student: str, st: dict, result: dict) -> str:
    m = len(result["candidates"])
    rho = "n/a" if st["spearman"] is None else f"{st['spearman']:+.2f}"
    if st["spearman_ci95"]:
        rho += f" [{st['spearman_ci95'][0]:+.2f}, {st['spearman_ci95'][1]:+.2f}] (bootstrap over seeds)"
    regret = f"{st['regret']:.2f} points" + (f" ± {st['regret_ci95']:.2f}" if st["regret_ci95"] is not None else "")
    if st["seeds"] < 2:
        verdict = (f"one seed per candidate: the oracle's order is not tested (candidate {st['leader']} scored"
                   " highest); give `oracle_seeds` >= 2, 3 or more for a verdict")
    elif st["separable"]:
        verdict = (f"the oracle prefers candidate {st['best']}, separable from every other candidate (paired 95%"
                   f" intervals over {st['seeds']} seeds above 0)")
    else:
        verdict = (f"**not separable**: on {st['seeds']} seeds the oracle cannot tell candidates"
                   f" {', '.join(map(str, st['top']))} apart (paired 95% intervals against the highest mean,"
                   f" candidate {st['leader']}, include 0), so it names no best; the pick is"
                   f" {'among them' if st['selected_in_top'] else 'not among them'}")
    return (f"- {student}: {verdict}. `{result['criterion']}`'s pick ranks {st['selected_rank']} of {m} by oracle mean"
            f" (regret {regret}); Spearman {rho} between the rule's and the oracle's order.")
