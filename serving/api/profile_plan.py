"""Which probe a runtime profile asks next, one at a time, and what it knows of the expert so far.

A :class:`ProbePlan` holds the candidate probes of one profile job (the probe set's probes the
job's kind can score), the strategy (:data:`coe.routers.probe_selection.STRATEGIES`) and the new
expert's outcomes so far. The job keeps a few probes in flight; each time one finishes it asks
:meth:`ProbePlan.next_probe` for the next, which comes from
:func:`coe.routers.probe_selection.next_probes` given every outcome so far (the probes still in
flight are skipped), the rule the offline simulation (``coe eval new-expert``) measures:

- ``round_robin`` (the default): file order, round-robin over the categories;
- ``random``: a fixed permutation (seed 0);
- ``adaptive``: anchor points: each probe extends the set of probes that best covers the
  candidates, where two probes are close when their queries embed alike (the service router's
  embedder) and the fitted router's experts did alike on them (its data);
- ``information``: the probes with the most Fisher information about the new expert under the
  2PL IRT model of :class:`coe.routers.probe_selection.ItemBank`, fitted on those outcomes and
  updated by the new expert's outcomes so far.

The item bank needs those outcomes; it is fitted on the candidates that have them, and every
strategy reports the ability estimate and its standard error from the new expert's outcomes on
those (what ``stop_when.se`` reads). ``adaptive`` and ``information`` ask only among them,
provided they cover the budget; otherwise (a user's own probe file) they fall back to
``round_robin``, and :attr:`ProbePlan.note` says so. Not thread-safe: one job uses it, on the event loop (only
:meth:`ProbePlan.fit` may run in a worker thread, before the first probe).
"""

from __future__ import annotations

import numpy as np

from coe.profile_records import AbilityEstimate

MIN_STOP_PROBES = 5   # stop_when.min_probes by default: an SE from fewer outcomes rests mostly on the prior
BANKED = ("adaptive", "information")   # the strategies that choose by the item bank


class ProbePlan:
    """The probes of one profile (see the module docstring).

    ``probes``: the candidates the kind can score, in file order; ``fitted``: the fitted router's
    data (``RoutingData``: ``queries``, ``quality [n, m]``, ``observed``); ``budget``: probes to ask
    at most; ``stop_se``/``min_probes``: the early stop. Construction is cheap; :meth:`fit` fits the
    item bank (blocking, tens of milliseconds for a hundred probes)."""

    def __init__(self, probes: list, strategy: str, budget: int, fitted, *, stop_se: float | None = None,
                 min_probes: int = MIN_STOP_PROBES) -> None:
        row_of = {q: i for i, q in enumerate(fitted.queries)}
        covered = [i for i, p in enumerate(probes) if p.query in row_of]
        experts = len(fitted.models) >= 2
        self.requested, self.strategy, self.note = strategy, strategy, None
        if strategy in BANKED and (len(covered) < len(probes) or not experts):
            if len(covered) >= budget and experts:
                self.note = (f"{strategy} chose among the {len(covered)} probes the fitted experts have outcomes on "
                             f"(of {len(probes)} in the set)")
                probes = [probes[i] for i in covered]
            else:
                self.strategy = "round_robin"
                self.note = (f"{strategy} fell back to round_robin: the fitted experts have outcomes on {len(covered)} "
                             f"of the {len(probes)} probes (the item bank needs at least the budget, {budget})")
        self.probes = probes
        self.budget = min(budget, len(probes))
        self.stop_se, self.min_probes = stop_se, min_probes
        # the item bank: the candidates the fitted experts answered (all of them for a BANKED strategy)
        banked = [i for i, p in enumerate(probes) if p.query in row_of] if experts else []
        self._bank_rows = [row_of[probes[i].query] for i in banked]   # rows of the fitted data
        self._bank_of = {c: k for k, c in enumerate(banked)}      # candidate index -> bank row
        if stop_se is not None and not banked:
            extra = "stop_when is not applied: no ability estimate without the fitted experts' outcomes on the probes"
            self.note = f"{self.note}; {extra}" if self.note else extra
        rows = self._bank_rows
        self._rows = np.asarray(fitted.quality, dtype=np.float64)[rows] if banked else None          # [B, M]
        obs = getattr(fitted, "observed", None)
        self._observed = np.asarray(obs, dtype=bool)[rows] if banked and obs is not None else None
        self.bank = None
        self.asked: list[int] = []          # candidate indices handed out, in order (in flight and failed too)
        self._recorded: set[int] = set()    # those whose outcome (or failure) is recorded
        self._answered: list[int] = []      # those with an outcome, in the order recorded
        self._outcomes: list[float] = []
        self.stopped: str | None = None     # why the plan stopped before the budget

    @property
    def categories(self) -> list[str]:
        return [p.category or "" for p in self.probes]

    def fit(self, embeddings: np.ndarray | None = None) -> None:
        """Fit the item bank on the fitted experts' outcomes (blocking). ``embeddings``: the fitted
        data's query embeddings ``[n, D]`` (row order), for ``adaptive``'s coverage; without them it
        covers the outcome patterns alone. A bank that cannot be fitted turns a BANKED strategy
        into ``round_robin``, saying so in ``note``."""
        if self._rows is None or self.bank is not None:
            return
        from coe.routers.probe_selection import ItemBank

        emb = None if embeddings is None else np.asarray(embeddings)[self._bank_rows]                  # [B, D]
        try:
            self.bank = ItemBank.fit(self._rows, self._observed, embeddings=emb)
        except ValueError as err:
            self._rows = None
            if self.strategy in BANKED:
                self.strategy = "round_robin"
            self.note = f"no item bank ({err}); probes taken round_robin and no ability estimate"

    def planned(self) -> list:
        """The probes the job asks at most: the order of ``round_robin`` and ``random``, which ignore
        the outcomes. For a BANKED strategy the choice depends on the bank, but every candidate has the
        fitted experts' outcomes, so only which probes are foreign matters (none): its round-robin order."""
        from coe.routers.probe_selection import next_probes

        strategy = "round_robin" if self.strategy in BANKED else self.strategy
        idx = next_probes(strategy, len(self.probes), [], [], self.budget, categories=self.categories, seed=0)
        return [self.probes[int(i)] for i in idx]

    @property
    def in_flight(self) -> list[int]:
        """Candidates handed out by :meth:`next_probe` whose outcome is not recorded yet."""
        return [i for i in self.asked if i not in self._recorded]

    def next_probe(self) -> tuple[int, object] | None:
        """``(index, probe)``: the next probe to ask, chosen from every outcome recorded so far and
        never one already handed out (in flight, answered or failed); None once the budget is
        handed out or the stop rule holds. It counts as asked from now on; report its outcome with
        :meth:`record`. A job keeps ``serving.profile_concurrency`` probes in flight by calling
        this each time one finishes."""
        if len(self.asked) >= self.budget or self.stopped is not None:
            return None
        idx = self._next(skip=[i for i in self.asked if i not in self._answered])
        if idx is None:
            return None
        self.asked.append(idx)
        return idx, self.probes[idx]

    def _next(self, *, skip: list[int]) -> int | None:
        from coe.routers.probe_selection import next_probes

        # next_probes reads the outcomes of ``asked``; a probe in flight or failed has none, so it
        # is asked for past them and they are dropped (the strategy's order of the rest is kept)
        idx = next_probes(self.strategy, len(self.probes), self._answered, self._outcomes, 1 + len(skip),
                          bank=self.bank if self.strategy in BANKED else None, categories=self.categories, seed=0)
        skipped = set(skip)
        return next((int(i) for i in idx if int(i) not in skipped), None)

    def record(self, index: int, outcome: float | None) -> None:
        """The new expert's outcome on candidate ``index``, handed out by :meth:`next_probe` (None:
        the request failed; it is not asked again). Raises ValueError for an index not in flight."""
        if index not in self.asked or index in self._recorded:
            raise ValueError(f"probe {index} is not in flight")
        self._recorded.add(index)
        if outcome is not None:
            self._answered.append(index)
            self._outcomes.append(float(outcome))
        ability = self.ability()
        if (self.stop_se is not None and ability is not None and ability.answered >= self.min_probes
                and ability.se <= self.stop_se and self.stopped is None and len(self.asked) < self.budget):
            self.stopped = (f"stopped after {ability.answered} outcomes: the ability's standard error "
                            f"{ability.se:.3f} is at most stop_when.se {self.stop_se:g}")

    def ability(self) -> AbilityEstimate | None:
        """The ability estimate from the outcomes so far on the probes the fitted experts answered
        (None without an item bank)."""
        if self.bank is None:
            return None
        pairs = [(self._bank_of[i], y) for i, y in zip(self._answered, self._outcomes) if i in self._bank_of]
        a = self.bank.ability([k for k, _ in pairs], [y for _, y in pairs])
        return AbilityEstimate(theta=round(a.theta, 4), se=round(a.se, 4), answered=a.answered)
