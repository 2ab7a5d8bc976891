"""Recruit-and-aggregate policies (Symbolic-MoE), evaluated offline on data that carries the replies.

A single router sends each query to one expert. A *recruit policy* sends it to the ``k`` experts
with the best utility (predicted quality − λ·cost, the shared policy's ranking), lets each
answer, and returns the majority answer (:func:`coe.scoring.answers.vote`: normalised final
answers, ties to the answer whose supporter has the higher predicted quality). A query costs the
sum of its recruited experts' costs, and scores the outcome of the reply that represents the
voted answer (the highest-ranked expert giving it), so no gold answer column is needed.

Policies (:class:`RecruitPolicy`):

- ``recruit-k``: always the top ``k``;
- ``recruit-k-margin@s``: the top ``k`` only when the utility margin between the first and the
  second expert is small, otherwise the first alone (Mediator's "recruit when unsure"); the
  threshold is set on the training queries' predicted scores so that a share ``s`` of them
  recruits at λ = 0 (no outcomes are used, like the fallback threshold);
- ``recruit-k-unc@s``: the same, triggered by the router's own uncertainty of its first choice
  (routers that declare ``gives_uncertainty``).

:func:`run_recruit` cross-validates these policies (and ``single``, the router alone) on train,
evaluates them on test on the same λ sweep and AIQ as single routing, and reports what limits
voting on the data (how often the top experts disagree, votes that rescue or spoil an answer).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from coe.errors import DatasetError

SHARES = (0.1, 0.2, 0.3, 0.5)
ALWAYS_K = (2, 3, 5)
WHEN_K = (3, 5)


@dataclass(frozen=True)
class RecruitPolicy:
    """Whom to recruit per query. ``k == 1`` is single routing; ``threshold`` is set by :meth:`calibrated`."""

    k: int = 1
    when: Literal["always", "margin", "uncertainty"] = "always"
    share: float = 1.0
    threshold: float | None = None

    @property
    def name(self) -> str:
        if self.k == 1:
            return "single"
        if self.when == "always":
            return f"recruit-{self.k}"
        return f"recruit-{self.k}-{'unc' if self.when == 'uncertainty' else 'margin'}@{self.share:g}"

    @property
    def family(self) -> str:
        """The name without the share (one curve per family goes in the report)."""
        return self.name.split("@")[0]

    def calibrated(self, quality: np.ndarray, cost: np.ndarray, uncertainty: np.ndarray | None) -> RecruitPolicy:
        """This policy with the threshold that makes ``share`` of these queries recruit at λ = 0."""
        if self.k == 1 or self.when == "always":
            return self
        signal = _trigger_signal(self.when, _utility(quality, cost, 0.0), uncertainty)
        q = self.share if self.when == "margin" else 1 - self.share   # margin: small recruits; uncertainty: large
        return replace(self, threshold=float(np.quantile(signal, q)))

    def mask(self, quality: np.ndarray, cost: np.ndarray, lam: float, uncertainty: np.ndarray | None = None
             ) -> np.ndarray:
        """``[N, M]`` bool: the experts recruited for each query at trade-off ``lam``."""
        u = _utility(quality, cost, lam)
        order = np.argsort(-u, axis=1, kind="stable")
        n, m = u.shape
        k = min(self.k, m)
        out = np.zeros((n, m), dtype=bool)
        rows = np.arange(n)[:, None]
        if k == 1 or self.when == "always":
            out[rows, order[:, :k]] = True
            return out
        signal = _trigger_signal(self.when, u, uncertainty, order)
        unsure = signal < self.threshold if self.when == "margin" else signal > self.threshold
        out[rows, order[:, :1]] = True
        out[rows[unsure], order[unsure, :k]] = True
        return out


def _utility(quality, cost, lam: float) -> np.ndarray:
    """quality − λ·cost with the shared policy's vanishing tie-break toward the cheaper expert."""
    q = np.asarray(quality, dtype=np.float64)
    c = np.broadcast_to(np.asarray(cost, dtype=np.float64), q.shape)
    return q - lam * c - 1e-9 * c / (np.abs(c).max() + 1e-30)


def _trigger_signal(when: str, u: np.ndarray, uncertainty, order: np.ndarray | None = None) -> np.ndarray:
    order = np.argsort(-u, axis=1, kind="stable") if order is None else order
    rows = np.arange(len(u))
    if when == "margin":
        return u[rows, order[:, 0]] - u[rows, order[:, 1]] if u.shape[1] > 1 else np.full(len(u), np.inf)
    if uncertainty is None:
        raise ValueError("the uncertainty trigger needs a router that reports uncertainty")
    return np.asarray(uncertainty, dtype=np.float64)[rows, order[:, 0]]


def policy_grid(gives_uncertainty: bool) -> list[RecruitPolicy]:
    """``single``, ``recruit-k`` for k in 2, 3, 5 and the recruit-when-unsure policies over :data:`SHARES`."""
    grid = [RecruitPolicy()] + [RecruitPolicy(k) for k in ALWAYS_K]
    for when in ("margin", "uncertainty") if gives_uncertainty else ("margin",):
        grid += [RecruitPolicy(k, when, s) for k in WHEN_K for s in SHARES]
    return grid


# --------------------------------------------------------------------------- answers and votes


class Ballots:
    """The normalised answers of a dataset ``[N, M]`` as integer codes (−1 abstains), with the
    vote of each recruited set cached (a λ sweep recruits the same sets over and over)."""

    def __init__(self, responses: np.ndarray, kind: str) -> None:
        from coe.scoring.answers import normalize_answer

        self.kind = kind
        codes: dict[str, int] = {}
        self.codes = np.full(responses.shape, -1, dtype=np.int64)
        for (i, j), text in np.ndenumerate(responses):
            a = normalize_answer(text, kind)
            if a is not None:
                self.codes[i, j] = codes.setdefault(a, len(codes))

    def represent(self, mask: np.ndarray, rank: np.ndarray, cache: dict | None = None) -> np.ndarray:
        """``[N]``: the column whose reply stands for each row's voted answer (the best-ranked
        recruited column when all of them abstain). ``cache`` is valid for one ``rank``."""
        from coe.scoring.answers import vote

        cache = {} if cache is None else cache
        rep = np.argmax(np.where(mask, rank, -np.inf), axis=1)
        bits = mask.astype(np.int64) @ (1 << np.arange(mask.shape[1], dtype=np.int64))
        for i in np.flatnonzero(mask.sum(axis=1) > 1):
            key = (int(i), int(bits[i]))
            if key not in cache:
                cols = np.flatnonzero(mask[i])
                won = vote([None if c < 0 else str(c) for c in self.codes[i, cols]], list(rank[i, cols]))
                cache[key] = int(cols[won]) if won is not None else int(rep[i])
            rep[i] = cache[key]
        return rep


def consistency(codes: np.ndarray, quality: np.ndarray) -> float:
    """Share of the queries with a right reply on which the normalised answers separate right
    from wrong (every right reply gives one answer that no wrong reply gives): 1.0 means the
    normalisation lets a vote be scored without a gold answer."""
    ok = n = 0
    for c, q in zip(codes, quality):
        right = set(c[q >= 1].tolist())
        if not right:
            continue
        n += 1
        ok += len(right) == 1 and -1 not in right and not (right & set(c[q < 1].tolist()))
    return ok / n if n else float("nan")


def detect_kind(responses: np.ndarray, quality: np.ndarray) -> tuple[str, dict[str, float]]:
    """The answer kind whose normalisation best separates right from wrong replies, and each kind's score."""
    from coe.scoring.answers import KINDS

    sample = np.arange(min(len(quality), 300))
    scores = {kind: consistency(Ballots(responses[sample], kind).codes, quality[sample]) for kind in KINDS}
    return max(KINDS, key=lambda k: (np.nan_to_num(scores[k], nan=-1.0), -KINDS.index(k))), scores


# --------------------------------------------------------------------------- sweeps


def sweep(policy: RecruitPolicy, scores, data, ballots: Ballots, lams) -> tuple[np.ndarray, ...]:
    """(cost ``[L, N]``, quality ``[L, N]``, representative column ``[N]`` and experts recruited ``[N]``
    at the first λ) realised by ``policy`` on ``data`` over ``lams``, from the router's ``scores``.

    At the last λ (the sweep's largest, where single routing sends every query to the cheapest
    expert) every policy routes single: AIQ holds a curve flat left of its cheapest point, so a
    policy that never gets cheap would otherwise be credited with its cheapest point's quality
    all the way down to the cheapest expert's cost. With this anchor every curve reaches the
    cheapest expert, as every single router's does."""
    cost_pred = scores.cost if scores.cost is not None else np.ones(len(scores.experts))
    c_all, rows = data.costs_or_ones(), np.arange(len(data))
    cache: dict = {}
    costs, quals, first = [], [], None
    for i, lam in enumerate(lams):
        pol = policy if i < len(lams) - 1 else RecruitPolicy()
        mask = pol.mask(scores.quality, cost_pred, float(lam), scores.uncertainty)
        rep = ballots.represent(mask, scores.quality, cache)
        costs.append((c_all * mask).sum(axis=1))
        quals.append(data.quality[rows, rep])
        if first is None:
            first = (rep, mask.sum(axis=1))
    return np.asarray(costs), np.asarray(quals), *first


def cross_validate_recruit(name: str, params: dict, data, embeddings, ballots: Ballots, *, folds: int = 5,
                           seed: int = 0, ctx=None) -> dict[str, list[float]]:
    """Held-out AIQ per fold of every policy of :func:`policy_grid` on ``data`` (train only).

    The router ``name`` (``params``) is fitted on K−1 folds; thresholds are calibrated on those
    folds' predicted scores and the sweep is scored on the held-out fold, with the same folds as
    :func:`coe.routers.tuning.cross_validate` (so ``single`` reproduces the router's own CV AIQ)."""
    from coe.routers.base import QueryBatch, create_router, router_class
    from coe.routers.evaluate import Reference
    from coe.routers.metrics import aiq
    from coe.routers.policy import lambda_sweep
    from coe.routers.tuning import kfold

    grid = policy_grid(router_class(name).gives_uncertainty)
    parts = kfold(len(data), folds, seed)
    out: dict[str, list[float]] = {p.name: [] for p in grid}
    for i in range(folds):
        held = parts[i]
        fit_idx = np.concatenate([parts[j] for j in range(folds) if j != i])
        router = create_router(name, params).fit(data.subset(fit_idx), embeddings[fit_idx], ctx)
        calib = router.score(QueryBatch([data.queries[j] for j in fit_idx], embeddings[fit_idx]))
        sub = data.subset(held)
        scores = router.score(QueryBatch(list(sub.queries), embeddings[held]))
        ref, lams = Reference.from_data(sub), lambda_sweep(sub.mean_costs())
        sub_ballots = _subset_ballots(ballots, held)
        for p in grid:
            cal = p.calibrated(calib.quality, _cost(calib), calib.uncertainty)
            c, q, _, _ = sweep(cal, scores, sub, sub_ballots, lams)
            out[p.name].append(aiq(c.mean(axis=1), q.mean(axis=1), ref.c_min, ref.c_max))
    return out


def _subset_ballots(ballots: Ballots, idx) -> Ballots:
    sub = object.__new__(Ballots)
    sub.kind, sub.codes = ballots.kind, ballots.codes[idx]
    return sub


def _cost(scores) -> np.ndarray:
    return scores.cost if scores.cost is not None else np.ones(len(scores.experts))


# --------------------------------------------------------------------------- coe eval --recruit


@dataclass
class RecruitRun:
    """What :func:`run_recruit` adds to ``coe eval``'s report."""

    results: dict          # label -> RouterResult (names start with "recruit")
    curves: dict           # label -> (cost [L, N], quality [L, N]) for the paired bootstrap
    info: dict             # report["recruit"] (without the CI, see :func:`finish`)


def run_recruit(inputs, base: str, params: dict, base_result, ref, *, folds: int = 5, seed: int = 0, ctx=None,
                cv: bool = True, kind: str | None = None) -> RecruitRun:
    """Cross-validate the recruit policies of :func:`policy_grid` over router ``base`` (fitted with
    ``params``) on train, evaluate every one on test over the single routers' λ sweep, and pick one.

    The policy with the best CV AIQ (``single`` included: recruiting must earn its cost) is
    ``selected``; its test AIQ is compared with ``base`` (the CV-selected single router) by the
    report's paired bootstrap. ``report["routers"]`` gets ``recruit-k`` for every k and, per
    recruit-when-unsure family, the share CV picked. Raises :class:`DatasetError` when the data
    carries no replies to vote on."""
    from coe.routers.base import QueryBatch, create_router
    from coe.routers.evaluate import RouterResult
    from coe.routers.metrics import aiq, apgr, cpt
    from coe.routers.policy import lambda_sweep

    train, test = inputs.train, inputs.test
    for d, side in ((train, "train"), (test, "test")):
        if d.responses is None:
            raise DatasetError(f"--recruit votes on the models' replies, and the {side} set {d.source} carries none "
                               "(RouterBench `<model>|model_response` or RouteLLM `<model>_response` columns)")
    chosen_kind, kind_scores = (kind, {}) if kind else detect_kind(train.responses, train.quality)
    ballots_tr, ballots_te = Ballots(train.responses, chosen_kind), Ballots(test.responses, chosen_kind)
    grid = policy_grid(create_router(base, params).gives_uncertainty)
    fold_aiq = cross_validate_recruit(base, params, train, inputs.train_emb, ballots_tr, folds=folds, seed=seed,
                                      ctx=ctx) if cv and len(train) >= 2 * folds else {}
    cv_aiq = {n: float(np.mean(v)) for n, v in fold_aiq.items()}

    router = create_router(base, params).fit(train, inputs.train_emb, ctx)
    calib = router.score(QueryBatch(list(train.queries), inputs.train_emb))
    scores = router.score(QueryBatch(list(test.queries), inputs.test_emb))
    lams = lambda_sweep(test.mean_costs())
    table, evaluated = [], {}
    for p in grid:
        cal = p.calibrated(calib.quality, _cost(calib), calib.uncertainty)
        c, q, rep, size = sweep(cal, scores, test, ballots_te, lams)
        cm, qm = c.mean(axis=1), q.mean(axis=1)
        evaluated[p.name] = (cal, c, q, rep, size)
        table.append({"policy": p.name, "cv_aiq": cv_aiq.get(p.name), "fold_aiq": fold_aiq.get(p.name),
                      "test_aiq": aiq(cm, qm, ref.c_min, ref.c_max), "threshold": cal.threshold,
                      "recruited_share_test": float((size > 1).mean()), "mean_experts_test": float(size.mean())})
    # per family (e.g. recruit-3-margin) the share CV prefers; recruit-k has no knob
    keep: dict[str, str] = {}
    for row in table:
        fam = evaluated[row["policy"]][0].family
        if fam == "single":
            continue
        best = keep.get(fam)
        if best is None or (row["cv_aiq"] or -np.inf) > (cv_aiq.get(best) or -np.inf):
            keep[fam] = row["policy"]
    results, curves = {}, {}
    for fam, pname in keep.items():
        cal, c, q, rep, size = evaluated[pname]
        cm, qm = c.mean(axis=1), q.mean(axis=1)
        counts = np.bincount(rep, minlength=len(router.experts)) / max(len(test), 1)
        results[fam] = RouterResult(
            name=fam, lams=[float(x) for x in lams], costs=[float(x) for x in cm], qualities=[float(x) for x in qm],
            shares={e: float(s) for e, s in zip(router.experts, counts)},
            aiq=aiq(cm, qm, ref.c_min, ref.c_max), apgr=apgr(cm, qm, ref.anchors),
            cpt50=cpt(cm, qm, ref.anchors, 0.5), cpt80=cpt(cm, qm, ref.anchors, 0.8), max_quality=float(qm.max()),
            decisions_per_s=base_result.decisions_per_s,
            params={"router": base, "k": cal.k, "when": cal.when, "share": cal.share if cal.when != "always" else None,
                    "threshold": cal.threshold, "recruited_share_test": float((size > 1).mean())},
            calibration=base_result.calibration)
        curves[fam] = (c, q)
    selected = max(cv_aiq, key=cv_aiq.get) if cv_aiq else None
    sel_label = None if selected is None else (base if selected == "single" else evaluated[selected][0].family)
    info = {
        "router": base, "router_params": params, "answer_kind": chosen_kind, "kind_consistency": kind_scores,
        "answered_share": {"train": float((ballots_tr.codes >= 0).mean()), "test": float((ballots_te.codes >= 0).mean())},
        "consistency_test": consistency(ballots_te.codes, test.quality),
        "folds": folds if cv_aiq else 0, "policies": table,
        "selected": None if selected is None else {"policy": selected, "label": sel_label, "cv_aiq": cv_aiq[selected],
                                                   "single_cv_aiq": cv_aiq.get("single")},
        "diagnostics": diagnostics(train, test, ballots_te, scores),
    }
    if selected is not None and sel_label not in results and sel_label != base:
        # the selected share is not the family's kept one only when CV ties; keep the selected curve too
        cal, c, q, _, _ = evaluated[selected]
        curves[sel_label] = (c, q)
    return RecruitRun(results, curves, info)


def finish(info: dict, cis: dict, results: dict) -> dict:
    """Add the selected policy's test AIQ and its paired-bootstrap CI against the single router."""
    sel = info.get("selected")
    if sel:
        base, label = info["router"], sel["label"]
        sel["test_aiq"] = results[label].aiq if label in results else None
        sel["single_test_aiq"] = results[base].aiq
        sel["vs_single"] = None if label == base else cis.get(label, {}).get(f"vs_{base}")
        sel["beats_single"] = bool(sel["vs_single"] and sel["vs_single"]["lo"] > 0)
    return info


def diagnostics(train, test, ballots: Ballots, scores) -> dict:
    """Why a vote can or cannot beat one expert on ``test``: fixed votes of the best models, and the
    router's first choice at λ = 0 against the vote of its top 3 (rescued, spoiled)."""
    rows = np.arange(len(test))
    by_train = list(np.argsort(-train.quality.mean(axis=0), kind="stable"))
    best, mean_q = by_train[0], test.quality.mean(axis=0)
    rank = np.broadcast_to(train.quality.mean(axis=0), test.quality.shape)
    out = {"best_single": {"model": test.models[best], "quality": float(mean_q[best])}}
    for k in (3, 5):
        top = by_train[:k]
        mask = np.zeros(test.quality.shape, dtype=bool)
        mask[:, top] = True
        rep = ballots.represent(mask, rank)
        codes = ballots.codes[:, top]
        out[f"fixed_top{k}_vote"] = {
            "models": [test.models[j] for j in top], "quality": float(test.quality[rows, rep].mean()),
            "cost": float(test.costs_or_ones()[:, top].sum(axis=1).mean()),
            "disagree_share": float(np.mean([len(set(c.tolist())) > 1 for c in codes]))}
    mask3 = RecruitPolicy(3).mask(scores.quality, _cost(scores), 0.0)
    top1 = RecruitPolicy(1).mask(scores.quality, _cost(scores), 0.0).argmax(axis=1)
    rep3 = ballots.represent(mask3, scores.quality)
    single_q, vote_q = test.quality[rows, top1], test.quality[rows, rep3]
    any3 = _any_triple_right(ballots.codes, test.quality)
    out["router_top3"] = {
        "single_quality": float(single_q.mean()), "vote_quality": float(vote_q.mean()),
        "disagree_share": float(np.mean([len(set(ballots.codes[i, mask3[i]].tolist())) > 1 for i in rows])),
        "rescued_share": float(np.mean(vote_q > single_q)), "spoiled_share": float(np.mean(vote_q < single_q)),
        # per query the better of (first choice, top-3 vote): what a perfect recruit trigger reaches
        "oracle_of_vote_or_single": float(np.maximum(single_q, vote_q).mean()),
    }
    out["oracle_any_triple_vote"] = any3
    out["oracle_single"] = float(test.quality.max(axis=1).mean())
    return out


def _any_triple_right(codes: np.ndarray, quality: np.ndarray) -> float:
    """Share of queries some three experts' vote gets right (ties to the first listed): the most a
    3-expert vote with a perfect choice of experts can reach."""
    from itertools import combinations

    from coe.scoring.answers import vote

    m = codes.shape[1]
    trip = list(combinations(range(m), 3)) if m >= 3 else [tuple(range(m))]
    hit = 0
    for c, q in zip(codes, quality):
        for t in trip:
            won = vote([None if c[j] < 0 else str(c[j]) for j in t], [0.0] * len(t))
            if won is not None and q[t[won]] >= 1:
                hit += 1
                break
    return hit / max(len(codes), 1)


def markdown_lines(report: dict) -> list[str]:
    """The ``## Recruit`` section of ``report.md``."""
    info = report["recruit"]
    d, sel = info["diagnostics"], info.get("selected") or {}
    lines = ["", "## Recruit and vote (Symbolic-MoE)", "",
             (f"Scores from `{info['router']}`; answers normalised as `{info['answer_kind']}` (replies with an answer: "
              f"{info['answered_share']['test']:.3f} on test; right/wrong separated on {info['consistency_test']:.3f} "
              "of the queries with a right reply). A recruited query costs the sum of its experts' costs and scores "
              "the outcome of the reply that stands for the voted answer.")]
    if sel:
        ci = sel.get("vs_single")
        lines.append(f"- selected by CV on train: **{sel['policy']}** (CV AIQ {sel['cv_aiq']:.4f}; single "
                     f"{_f(sel.get('single_cv_aiq'))}); test AIQ {_f(sel.get('test_aiq'))} vs single "
                     f"{_f(sel.get('single_test_aiq'))}: " + ("the same policy" if ci is None else
                     f"{ci['diff']:+.4f} [{ci['lo']:+.4f}, {ci['hi']:+.4f}]") +
                     (" — beats single" if sel.get("beats_single") else " — does **not** beat single"))
    rt, f3 = d["router_top3"], d["fixed_top3_vote"]
    lines += [
        (f"- best single model (by train): {d['best_single']['model']} {d['best_single']['quality']:.4f} on test; "
         f"fixed vote of the 3 best ({', '.join(f3['models'])}): {f3['quality']:.4f} at cost {f3['cost']:.4g} "
         f"(they disagree on {f3['disagree_share']:.3f} of the queries); fixed top-5 vote "
         f"{d['fixed_top5_vote']['quality']:.4f}"),
        (f"- the router's first choice at λ = 0: {rt['single_quality']:.4f}; the vote of its top 3: "
         f"{rt['vote_quality']:.4f} (disagree on {rt['disagree_share']:.3f}; the vote rescues {rt['rescued_share']:.3f} "
         f"and spoils {rt['spoiled_share']:.3f} of the queries); a perfect recruit trigger (per query the better of "
         f"the two) {rt['oracle_of_vote_or_single']:.4f}"),
        f"- oracle: best single reply {d['oracle_single']:.4f}; some 3-expert vote right {d['oracle_any_triple_vote']:.4f}",
        "", "| policy | CV AIQ (train) | test AIQ | threshold | recruited share (test, λ=0) | experts per query |",
        "|---|---|---|---|---|---|"]
    for r in sorted(info["policies"], key=lambda r: -(r["cv_aiq"] if r["cv_aiq"] is not None else -1)):
        lines.append(f"| {r['policy']} | {_f(r['cv_aiq'])} | {r['test_aiq']:.4f} | {_f(r['threshold'], '.4g')} | "
                     f"{r['recruited_share_test']:.3f} | {r['mean_experts_test']:.2f} |")
    return lines


def _f(v, spec=".4f") -> str:
    return "—" if v is None else format(v, spec)
