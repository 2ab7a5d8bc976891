"""``coe router list|fit`` and ``coe eval`` (offline router evaluation)."""

from __future__ import annotations

import sys
from pathlib import Path


def register(sub) -> None:
    router = sub.add_parser("router", help="list routers or fit one on outcome data")
    cmds = router.add_subparsers(dest="router_command", metavar="ACTION")
    cmds.required = True
    lst = cmds.add_parser("list", help="registered routers")
    lst.set_defaults(func=_list)
    fit = cmds.add_parser("fit", help="fit a router on a routing dataset and save it (router.fitted loads it)")
    fit.add_argument("--config", help="config file (router name, params, embedder); default: the embedded one")
    fit.add_argument("--data", required=True, help="routing dataset (RouterBench/RouteLLM CSV, scores JSON(L), native JSONL)")
    fit.add_argument("--out", required=True, help="folder to write the fitted router to")
    fit.add_argument("--router", help="router name (default: router.name of the config)")
    fit.add_argument("--format", default="auto", help="dataset format (auto, routerbench, routellm, scores, native)")
    fit.add_argument("--costs", help="model -> cost-per-query table (JSON/YAML/CSV)")
    fit.add_argument("--no-cv", action="store_true", help="use the config's params as they are (no cross-validation)")
    fit.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    fit.add_argument("--target-cost", type=float, help="calibrate λ/τ so the average predicted cost per query is at most this")
    fit.add_argument("--target-top-share", type=float,
                     help="calibrate λ/τ so at most this share (0..1) of queries go to the most expensive expert")
    fit.add_argument("--policy-mode", choices=["tradeoff", "threshold"], default="tradeoff",
                     help="which knob the calibration sets (default tradeoff: λ)")
    fit.add_argument("--fallback-expert", help="expert for queries the router is unsure about (irt, knn, learned)")
    fit.add_argument("--target-fallback-share", type=float,
                     help="with --fallback-expert: calibrate router.policy.max_uncertainty so this share (0..1) "
                     "of the training queries falls back")
    fit.add_argument("--quiet", action="store_true", help="no progress bars")
    fit.set_defaults(func=_fit)

    ev = sub.add_parser("eval", help="evaluate routers offline: cost-quality curves, AIQ, APGR, CPT")
    # --train/--out are required unless a subcommand (`coe eval new-expert`) is given: checked in _eval
    ev.add_argument("--train", help="training routing dataset (required)")
    ev.add_argument("--test", help="test routing dataset (or use --split)")
    ev.add_argument("--split", type=float, help="with only --train: the train fraction of a seeded shuffle, e.g. 0.7")
    ev.add_argument("--router", action="append", dest="routers", metavar="NAME",
                    help="router to evaluate (repeatable; default: every registered router)")
    ev.add_argument("--out", help="folder for report.json, report.md, cost_quality.png (required)")
    ev.add_argument("--costs", help="model -> cost-per-query table for data without costs (else every model costs 1)")
    ev.add_argument("--format", default="auto", help="dataset format (auto, routerbench, routellm, scores, native)")
    ev.add_argument("--embedder", default="minilm-l6", help="sentence embedder: alias, folder or hub id")
    ev.add_argument("--folds", type=int, default=5, help="cross-validation folds on train (default 5)")
    ev.add_argument("--no-cv", action="store_true", help="default hyperparameters, no cross-validation")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap replicates for the CIs (default 1000)")
    ev.add_argument("--fallback-share", type=float, default=0.1,
                    help="share of queries the uncertainty fallback variants send to the strong model (0: none); "
                    "its threshold is calibrated on out-of-fold training queries")
    ev.add_argument("--recruit", action="store_true",
                    help="also evaluate recruit-and-vote policies (top-k experts answer, majority of normalised answers) "
                    "over the CV-selected router; needs the models' replies in the data")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=lambda args: _eval(args, ev))
    _register_new_expert(ev)


def _list(args) -> int:
    from coe.routers import router_class, router_names

    for name in router_names():
        cls = router_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        needs = "labels" if cls.needs_labels else ("outcomes" if cls.needs_outcomes else "descriptions")
        print(f"{name:12} needs {needs:12} {doc}")
    return 0


def _fit(args) -> int:
    from coe.config import load_config
    from coe.errors import ConfigError
    from coe.profile_records import data_outcome_kind
    from coe.routers.base import FitContext, router_class, save_router
    from coe.routers.datasets import embed_routing_data, load_routing_data
    from coe.routers.embedding import Embedder
    from coe.routers.tuning import cross_validate

    cfg = load_config(args.config)
    name = args.router or cfg.router.name
    cls = router_class(name)
    if cls.needs_labels:
        raise ConfigError(f"router {name!r} reads the true outcomes and cannot be fitted for serving")
    data = load_routing_data(args.data, args.format, args.costs)
    embedder = Embedder(cfg.router.embedder, disk_cache=True, progress=not args.quiet)
    x, _, prefix = embed_routing_data(embedder, data, None)
    ctx = FitContext(
        descriptions={e.id: [e.description, *e.examples] for e in cfg.experts},
        skills={e.id: list(e.skills) for e in cfg.experts},
        categories={e.id: e.category for e in cfg.experts if e.category},
        embed=embedder.encode,
    )
    base = dict(cfg.router.params) if name == cfg.router.name else {}
    cv = None
    if not args.no_cv and cls.cv_grid:
        grid = {k: v for k, v in cls.cv_grid.items() if k not in base}
        cv = cross_validate(name, data, x, grid=grid, base_params=base, folds=args.folds, ctx=ctx)
        params = cv.params
    else:
        params = base
    router = cls(params).fit(data, x, ctx)
    policy = None
    if args.fallback_expert is not None and args.target_fallback_share is None:
        raise ConfigError("--fallback-expert needs --target-fallback-share (the share of queries that may fall back)")
    if (args.target_cost is not None or args.target_top_share is not None
            or args.target_fallback_share is not None):
        policy = _calibrate(args, cfg, router, data, x)
    extra = {
        "calibrated_policy": policy,
        "data": str(Path(args.data).resolve()),
        "outcome_kind": data_outcome_kind(args.data),   # runtime profiles must measure the same kind
        "rows": len(data),
        "skipped": dict(data.skipped),
        "stripped_prefix_chars": len(prefix),
        "cv": None if cv is None else {"folds": cv.folds, "cv_aiq": cv.score, "params": cv.params},
    }
    out = save_router(router, args.out, embedder=cfg.router.embedder, extra=extra)
    skipped = sum(data.skipped.values())
    print(f"fitted {name} on {len(data)} rows ({skipped} skipped) over {len(router.experts)} experts; params "
          f"{router.params.model_dump()}" + (f"; cv AIQ {cv.score:.4f}" if cv else ""))
    if policy is not None:
        knob = f"lam: {policy['lam']:.6g}" if policy["mode"] == "tradeoff" else f"tau: {policy['tau']:.6g}"
        if policy.get("fallback_expert"):
            knob += f", fallback_expert: {policy['fallback_expert']}, max_uncertainty: {policy['max_uncertainty']:.6g}"
        print(f"calibrated policy (put it in the config): router.policy: {{mode: {policy['mode']}, {knob}}}")
        print(f"  costs used: {policy['costs_from']}")
    print(f"saved to {out}")
    return 0


def _calibrate(args, cfg, router, data, x) -> dict:
    """λ/τ (and the fallback threshold) on the training queries' predicted scores, as RouteLLM does
    (no outcomes are used). Costs are the experts' configured ``cost`` when the config lists every
    fitted expert (that is what the service trades off), else the data's mean costs."""
    from coe.errors import ConfigError
    from coe.routers.base import QueryBatch
    from coe.routers.policy import SelectionPolicy, calibrate, calibrate_fallback

    scores = router.score(QueryBatch(list(data.queries), x))
    configured = {e.id: float(e.cost) for e in cfg.experts}
    if all(e in configured for e in router.experts):
        cost, source = [configured[e] for e in router.experts], "the config's expert cost fields"
    else:
        cost, source = scores.cost, "the data's mean cost per expert (the config does not list every fitted expert)"
    if args.target_cost is not None or args.target_top_share is not None:
        cal = calibrate(scores.quality, cost, mode=args.policy_mode,
                        target_cost=args.target_cost, target_top_share=args.target_top_share)
    else:
        cal = SelectionPolicy.from_config(cfg.router.policy)
    if args.target_fallback_share is not None:
        if not router.gives_uncertainty:
            raise ConfigError(f"router {router.name!r} does not report uncertainty; the fallback needs irt, knn or learned")
        if args.fallback_expert is None:
            raise ConfigError("--target-fallback-share needs --fallback-expert (one of the fitted experts)")
        cal = calibrate_fallback(cal, scores.quality, cost, scores.uncertainty, scores.experts,
                                 fallback_expert=args.fallback_expert, target_share=args.target_fallback_share)
    return {"mode": cal.mode, "lam": cal.lam, "tau": cal.tau, "fallback_expert": cal.fallback_expert,
            "max_uncertainty": cal.max_uncertainty, "costs_from": source}



def _train_test(args, train):
    """``(train, test)``: ``--test FILE`` in ``train``'s model order, or ``train`` cut by ``--split``."""
    from coe.errors import DatasetError
    from coe.routers.datasets import load_routing_data
    from coe.routers.report import split_data

    if args.test and args.split is not None:
        raise DatasetError("give either --test or --split, not both")
    if args.test:
        return train, load_routing_data(args.test, args.format, args.costs).reordered(train.models)
    if args.split is None:
        raise DatasetError("give --test FILE, or --split FRACTION to cut --train into train and test")
    skipped = train.skipped
    train, test = split_data(train, args.split, args.seed)
    train.skipped = test.skipped = skipped
    return train, test

def _eval(args, parser=None) -> int:
    missing = [f"--{k}" for k in ("train", "out") if not getattr(args, k)]
    if missing and parser is not None:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    from coe.errors import DatasetError
    from coe.routers.base import router_class, router_names
    from coe.routers.datasets import embed_routing_data, load_routing_data
    from coe.routers.embedding import Embedder
    from coe.routers.report import EvalInputs, run_eval, write_report

    if args.bootstrap < 10:
        raise DatasetError(f"--bootstrap must be at least 10 replicates, got {args.bootstrap}")
    if not 0 <= args.fallback_share < 1:
        raise DatasetError(f"--fallback-share must be in [0, 1), got {args.fallback_share}")
    names = args.routers or router_names()
    for n in names:
        router_class(n)   # unknown names fail before any work, listing the available ones
    train = load_routing_data(args.train, args.format, args.costs)
    train, test = _train_test(args, train)
    embedder = Embedder(args.embedder, disk_cache=True, progress=not args.quiet)
    if not args.quiet:
        print(f"embedding {len(train) + len(test)} queries (cached under {embedder.disk_path})", file=sys.stderr)
    xtr, xte, _ = embed_routing_data(embedder, train, test)
    inputs = EvalInputs(train, test, xtr, xte, args.embedder, embedder.encode)
    report = run_eval(inputs, names, folds=args.folds, cv=not args.no_cv, seed=args.seed, progress=not args.quiet,
                      n_boot=args.bootstrap, fallback_share=args.fallback_share, recruit=args.recruit)
    out = write_report(report, args.out)
    zero = report["zero_router_aiq"]
    print(f"zero router AIQ {zero:.4f}; best single {report['best_single']['model']} "
          f"({report['best_single']['quality']:.4f})")
    for name, r in sorted(report["routers"].items(), key=lambda kv: -kv[1]["aiq"]):
        c = r["ci"]["vs_zero"]
        print(f"  {name:18} AIQ {r['aiq']:.4f} ({c['diff']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"
              f"{' includes 0' if c['includes_zero'] else ''})  APGR {r['apgr']:.3f}  "
              f"max quality {r['max_quality']:.4f}  {r['decisions_per_s']:.0f} decisions/s")
    sel = report.get("selected")
    if sel:
        print(f"selected by CV: {sel['name']} (test AIQ {sel['test_aiq']:.4f}); targets "
              f"{'met' if sel['meets_targets'] else 'NOT met'}")
    print(f"report: {out / 'report.md'}")
    return 0


# --------------------------------------------------------------------------- coe eval new-expert


def _register_new_expert(ev) -> None:
    cmds = ev.add_subparsers(dest="eval_command", metavar="[new-expert]",
                             title="simulations (optional; without one, `coe eval` evaluates routers)")
    ne = cmds.add_parser("new-expert", help="how many probes a new expert needs: leave each model out, profile it "
                         "on a budget of probes chosen by a strategy, route the test queries")
    ne.add_argument("--train", required=True, help="training routing dataset (the candidate probes)")
    ne.add_argument("--test", help="test routing dataset (or use --split)")
    ne.add_argument("--split", type=float, help="with only --train: the train fraction of a seeded shuffle, e.g. 0.5")
    ne.add_argument("--out", required=True, help="folder for report.json, report.md, aiq_budget.png")
    ne.add_argument("--costs", help="model -> cost-per-query table for data without costs (else every model costs 1)")
    ne.add_argument("--format", default="auto", help="dataset format (auto, routerbench, routellm, scores, native)")
    ne.add_argument("--budgets", default="10,25,50,100,200", help="probe budgets, comma-separated")
    ne.add_argument("--strategies", default="adaptive,information,round_robin,random",
                    help="probe strategies, comma-separated (adaptive, information, round_robin, random)")
    ne.add_argument("--seeds", type=int, default=5, help="seeds of the random strategy (default 5)")
    ne.add_argument("--wave", type=int, default=5, help="probes per wave (the ability estimate is updated between waves)")
    ne.add_argument("--router", default="knn", help="router to fit (any that fits on outcomes; default knn)")
    ne.add_argument("--cv", action="store_true", help="choose the router's params by cross-validation on train "
                    "(all models) first; default: the router's defaults")
    ne.add_argument("--impute", default="knn", choices=["knn", "irt"],
                    help="fill of the new expert's unmeasured cells for routers that do not read the mask: knn (the "
                    "service's fill, default) or irt (the item bank's prediction plus the kNN-spread residual)")
    ne.add_argument("--embedder", default="minilm-l6", help="sentence embedder: alias, folder or hub id")
    ne.add_argument("--seed", type=int, default=0)
    ne.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap replicates for the CIs (default 1000)")
    ne.add_argument("--quiet", action="store_true", help="no progress output")
    ne.set_defaults(func=_eval_new_expert)


def _int_list(text: str, flag: str) -> list[int]:
    from coe.errors import DatasetError

    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise DatasetError(f"{flag} takes comma-separated integers, got {text!r}") from None


def _eval_new_expert(args) -> int:
    from coe.routers.base import FitContext
    from coe.routers.datasets import embed_routing_data, load_routing_data
    from coe.routers.embedding import Embedder
    from coe.routers.new_expert import NewExpertSetup, simulate
    from coe.routers.new_expert_report import write_new_expert_report

    setup = NewExpertSetup(strategies=[s.strip() for s in args.strategies.split(",") if s.strip()],
                           budgets=_int_list(args.budgets, "--budgets"), seeds=args.seeds, router=args.router,
                           impute=args.impute, wave=args.wave, n_boot=args.bootstrap, seed=args.seed)
    train = load_routing_data(args.train, args.format, args.costs)
    setup.check(len(train.models))       # bad options fail before any embedding
    train, test = _train_test(args, train)
    embedder = Embedder(args.embedder, disk_cache=True, progress=not args.quiet)
    xtr, xte, _ = embed_routing_data(embedder, train, test)
    ctx = FitContext(seed=args.seed, embed=embedder.encode)
    if args.cv:
        from coe.routers.tuning import cross_validate

        setup.params = cross_validate(setup.router, train, xtr, seed=args.seed, ctx=ctx).params
    say = None if args.quiet else (lambda m: print(f"  leaving out {m}", file=sys.stderr))
    report = simulate(train, test, xtr, xte, setup, ctx=ctx, progress=say)
    report["embedder"] = args.embedder
    out = write_new_expert_report(report, args.out)
    ref = report["reference"]
    print(f"AIQ without the new expert {ref['aiq_without']:.4f}, with its full profile {ref['aiq_full']:.4f} "
          f"(mean over {len(report['models'])} held-out models; {len(ref['counted_models'])} move AIQ by "
          f"≥ {report['setup']['min_gain']})")
    for r in report["summary"]:
        rec = "—" if r["recovered"] is None else f"{r['recovered']:.3f} {r['recovered_ci']}"
        print(f"  {r['strategy']:12} b={r['budget']:<4} AIQ {r['aiq']:.4f}  recovered {rec}  Brier {r['brier']:.4f}")
    print(f"report: {out / 'report.md'}")
    return 0

