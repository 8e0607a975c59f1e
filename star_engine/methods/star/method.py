"""STAR wired into a model: pick the neurons, build the protected prior, take sign steps that cannot overshoot.

One optimisation works on a *problem*: token sequences and, in each, the positions that predict target
tokens. Batch mode makes one problem of every target token of every case; token mode one problem per
failing token, in order.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ...capture import target_leads
from ...hooks import record_activations, record_projections
from ...locate import (contrast_neurons, ffn_skip_losses, fisher_neurons, greedy_neurons, neuron_masks, neuron_scores,
                       top_layers)
from ...protect import corpus_statistic, output_fisher
from ...semantic import semantic_steer
from ...session import RepairSession
from ..base import RepairMethod
from .config import StarConfig
from .solver import (Metric, least_change_patch, natural_direction, protected_metric, protected_prior, realise,
                     seme_direction)

_MAX_SCALE = 8.0   # backtrack: a kept step may grow the scale up to this multiple of lr


@dataclass
class _Problem:
    inputs: list[torch.Tensor]    # (1, T) token ids, one per sequence
    spans: list[slice]            # the predicting positions in each
    target: torch.Tensor          # (N,) the target token at every predicting position, concatenated
    kept: torch.Tensor | None = None   # (N,) bool: positions of earlier fixes (keep rows), not to be fixed

    def __post_init__(self):
        if self.kept is None:
            self.kept = torch.zeros(len(self.target), dtype=torch.bool)


def _problem_of(encoded, kept: bool) -> _Problem:
    """The predicting positions of every target token of `encoded`, all new targets or all keep rows."""
    target = torch.cat([torch.tensor(enc.target_ids) for enc in encoded])
    return _Problem([torch.tensor([list(enc.ids)]) for enc in encoded],
                    [slice(len(enc.prompt_ids) - 1, len(enc.ids) - 1) for enc in encoded],
                    target, torch.full((len(target),), kept))


def _joined(problem: _Problem, keep: _Problem) -> _Problem:
    return _Problem(problem.inputs + keep.inputs, problem.spans + keep.spans,
                    torch.cat([problem.target, keep.target]), torch.cat([problem.kept, keep.kept]))


_SCALES = [2.0**k for k in range(-4, 9)]   # minimal: the scales tried, in units of lr


@dataclass
class _Pass:
    loss: torch.Tensor
    logits: torch.Tensor                   # (N, vocab), detached
    predicted: torch.Tensor                # (N,)
    rows: dict[int, torch.Tensor]          # layer -> (N, d_ff) activations at the predicting positions
    margin: float                          # min over the new targets of target logit - best other logit


def _span_logits(model, ids: torch.Tensor, span: slice) -> torch.Tensor:
    """(len(span), vocab) logits at the predicting positions only: the output head, forward and backward, is a
    large share of a pass over a short sequence, and the prompt's positions need none of it."""
    return model(input_ids=ids, logits_to_keep=torch.arange(ids.shape[1])[span]).logits[0]


_LOGITS_FLOATS = 32 << 20   # logits held at once by one batched pass (128 MB of float32)


@torch.no_grad()
def _problem_logits(model, inputs: list[torch.Tensor], spans: list[slice]) -> torch.Tensor:
    """(N, vocab) logits at every predicting position of every sequence, in order, without gradients, from
    few forward passes: the sequences go in batches right-padded to the longest. Causal attention keeps the
    padding unseen by the real tokens and their positions unchanged; on a CPU one pass over a batch of short
    sequences costs little more than a pass over one."""
    if not inputs:
        return torch.zeros(0, model.config.get_text_config().vocab_size)
    length = max(ids.shape[1] for ids in inputs)
    first = min(range(ids.shape[1])[span].start for ids, span in zip(inputs, spans))
    kept = torch.arange(first, length)
    per_batch = max(1, _LOGITS_FLOATS // (len(kept) * model.config.get_text_config().vocab_size))
    out = []
    for b in range(0, len(inputs), per_batch):
        batch = inputs[b : b + per_batch]
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        for row, seq in enumerate(batch):
            ids[row, : seq.shape[1]] = seq[0]
        logits = model(input_ids=ids, logits_to_keep=kept).logits
        for row, (seq, span) in enumerate(zip(batch, spans[b : b + per_batch])):
            positions = torch.arange(seq.shape[1])[span]
            out.append(logits[row, positions - first])
    return torch.cat(out)


def _fix_margin(logits: torch.Tensor, problem: _Problem) -> float:
    """The least lead of a new target; -inf when an earlier fix (keep row) is no longer the argmax."""
    margins = target_leads(logits, problem.target)
    if bool((margins[problem.kept] <= 0).any()):
        return float("-inf")
    return float(margins[~problem.kept].min())


def _soft_margins(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N,) target logit minus the log-sum-exp of all others: smooth, and never above the hard margin."""
    right = logits.gather(1, target[:, None]).squeeze(1)
    return right - logits.scatter(1, target[:, None], float("-inf")).logsumexp(-1)


def _shortfall(margins: torch.Tensor, wanted: float | torch.Tensor) -> float:
    return float((wanted - margins).clamp_min(0).sum())


@dataclass
class _Start:
    """Hard and soft margins at every position of a problem before the repair."""
    lead: torch.Tensor
    soft: torch.Tensor

    @staticmethod
    def of(logits: torch.Tensor, target: torch.Tensor) -> "_Start":
        return _Start(target_leads(logits, target), _soft_margins(logits, target))

    def joined(self, other: "_Start") -> "_Start":
        return _Start(torch.cat([self.lead, other.lead]), torch.cat([self.soft, other.soft]))


def _keep_targets(lead: torch.Tensor, soft: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """An earlier fix's allowance, from its hard `lead` and `soft` margins before the repair: it must stay the
    argmax, and its soft margin may drop by at most `_KEEP_SLACK` or half its lead (so that a hundred
    repairs, each taking at most half of what is left, never take it all). One already lost (no lead) is
    neither fixed nor held. Returns (the soft margin to hold, the hard margin that counts as held)."""
    slack = (lead / 2).clamp(max=_KEEP_SLACK)
    wanted = torch.where(lead > 0, soft.clamp(max=margin) - slack, float("-inf"))
    floor = torch.where(lead > 0, _LEAST_LEAD, float("-inf"))   # a tie is lost, as in _fix_margin
    return wanted, floor


@dataclass(eq=False)
class _Earlier:
    """One earlier fix a repair must leave in place: its positions as keep rows, its margins before."""
    problem: _Problem
    before: _Start

    def moved(self, logits: torch.Tensor, margin: float) -> bool:
        """Do these logits at its positions move it past its allowance?"""
        wanted, floor = _keep_targets(self.before.lead, self.before.soft, margin)
        return bool((_soft_margins(logits, self.problem.target) < wanted).any()
                    or (target_leads(logits, self.problem.target) < floor).any())


_KEEP_ROUNDS = 3   # solves resumed with newly moved earlier fixes joined, at most

_BAND = 0.25       # least_change: positions this close above the margin are held at it too
_KEEP_SLACK = 0.25  # least_change: how far an earlier fix's soft margin may drop (at most half its lead)
_OVERSHOOT = 0.05  # least_change: aim this far past the margin (the margins are not linear)
_LEAST_LEAD = float(torch.nextafter(torch.tensor(0.0), torch.tensor(1.0)))  # still the argmax: any lead above 0


class StarMethod(RepairMethod):
    name = "star"
    Config = StarConfig

    def repair(self, session: RepairSession) -> None:
        if self.config.mode == "batch":
            self._solve(session, self._batch_problem(session))
            return
        for point in session.failing_points():
            problem = _Problem([torch.tensor([list(point.context_ids)])], [slice(len(point.context_ids) - 1, None)],
                               torch.tensor([point.target]))
            if not self._solve(session, problem) and self.config.give_up:
                return

    def tightened(self) -> "StarMethod | None":
        """The same method with fewer neurons and stronger protection (for the driver's locality guard)."""
        cfg = self.config
        counted = cfg.sparsity in ("contrast", "fisher", "greedy")
        if counted and cfg.neurons < 8:
            return None
        neurons = cfg.neurons // 2 if counted else cfg.neurons
        return StarMethod(replace(cfg, neurons=neurons, ridge=cfg.ridge / 10, keep_weight=cfg.keep_weight * 4,
                                  protect="covariance" if cfg.protect == "none" else cfg.protect))

    def _batch_problem(self, session: RepairSession) -> _Problem:
        """Every target token of every case. Earlier fixes join later, as keep rows, only where a solve
        would move them (`_solve`)."""
        return _problem_of(session.cases, kept=False)

    # -- one optimisation ---------------------------------------------------------------------------

    def _forward(self, session: RepairSession, problem: _Problem, layers: list[int]) -> _Pass:
        logits, rows = [], {l: [] for l in layers}
        with record_activations(session.arch, layers) as acts:
            for ids, span in zip(problem.inputs, problem.spans):
                logits.append(_span_logits(session.lm.model, ids, span))
                for l in layers:
                    rows[l].append(acts[l][0, span].detach())
        logits = torch.cat(logits)
        return _Pass(F.cross_entropy(logits, problem.target), logits.detach(), logits.argmax(-1).detach(),
                     {l: torch.cat(r) for l, r in rows.items()}, _fix_margin(logits.detach(), problem))

    def _solve(self, session: RepairSession, problem: _Problem) -> bool:
        """Steps on one problem until every target is the argmax (True) or the budget is spent (False).

        Earlier fixes are an active set: the first solve sees only the new targets (the statistic already
        protects the earlier fixes' activations); every earlier fix the result moves past its allowance
        (`_keep_targets`) then joins as keep rows and the solve goes on from where it stopped, up to
        `_KEEP_ROUNDS` times. A repair pays only for the few earlier fixes it actually touches, not for
        the whole stack at every step."""
        cfg, arch = self.config, session.arch
        layers = self._layers(session, problem)
        with torch.no_grad():
            first = self._forward(session, problem, layers)
        if torch.equal(first.predicted, problem.target):
            return True
        with torch.no_grad():
            earlier = self._earlier_fixes(session) if cfg.mode == "batch" else []
        steered = first.predicted != problem.target
        if cfg.mode == "batch":   # token mode's walk counts its failing tokens itself
            session.failures_seen += int(steered.sum())
        S = torch.stack([semantic_steer(session.lm, int(t), int(a), cfg.steer) if s else torch.zeros(arch.d_model)
                         for t, a, s in zip(problem.target, first.predicted, steered)])
        neurons = self._neurons(session, problem, layers, first, steered)
        layers = sorted(neurons)
        metrics = self._metrics(session, neurons)
        origin = {l: arch.columns(l)[:, neurons[l]].clone() for l in layers}
        start = _Start.of(first.logits, problem.target)
        budget = cfg.keep_rows
        for round_ in range(_KEEP_ROUNDS + 1):
            fixed = self._optimise(session, problem, layers, neurons, metrics, S, steered, start, origin)
            joining = self._moved(session, earlier, budget) if round_ < _KEEP_ROUNDS else []
            if not joining:
                return fixed
            budget -= sum(len(e.problem.target) for e in joining)
            earlier = [e for e in earlier if e not in joining]
            for e in joining:
                n = len(e.problem.target)
                problem, start = _joined(problem, e.problem), start.joined(e.before)
                S = torch.cat([S, torch.zeros(n, arch.d_model)])        # keep rows: no steer
                steered = torch.cat([steered, torch.zeros(n, dtype=torch.bool)])
        return fixed

    @torch.no_grad()
    def _moved(self, session: RepairSession, earlier: list["_Earlier"], budget: int) -> list["_Earlier"]:
        """The earlier fixes the patch so far moves past their allowance, in stack order, within `budget`
        target tokens."""
        if not earlier:
            return []
        session.check_cancel()
        logits = _problem_logits(session.lm.model, [e.problem.inputs[0] for e in earlier],
                                 [e.problem.spans[0] for e in earlier])
        out = []
        for e, now in zip(earlier, logits.split([len(e.problem.target) for e in earlier])):
            if len(e.problem.target) <= budget and e.moved(now, self.config.margin):
                out.append(e)
                budget -= len(e.problem.target)
        return out

    def _optimise(self, session, problem, layers, neurons, metrics, S, steered, start, origin) -> bool:
        """One run of the configured step rule on `problem`, from the columns as they are."""
        cfg = self.config
        if cfg.step_rule == "least_change":   # stalled: natural minimal steps from the patch it reached
            return self._least_change(session, problem, layers, neurons, metrics, start, origin) or \
                StarMethod(replace(cfg, step_rule="minimal", direction="natural", lr=1.0))._steps(
                    session, problem, layers, neurons, metrics, S, steered)
        return self._steps(session, problem, layers, neurons, metrics, S, steered)

    def _earlier_fixes(self, session: RepairSession) -> list["_Earlier"]:
        """Every earlier fix with its margins before this repair (none when earlier fixes are not protected)."""
        if self.config.keep_weight <= 0 or self.config.keep_rows <= 0:
            return []
        problems = [_problem_of([enc], kept=True) for enc in session.protect]
        logits = _problem_logits(session.lm.model, [p.inputs[0] for p in problems], [p.spans[0] for p in problems])
        return [_Earlier(p, _Start.of(now, p.target))
                for p, now in zip(problems, logits.split([len(p.target) for p in problems]))]

    def _steps(self, session, problem, layers, neurons, metrics, S, steered) -> bool:
        """Up to `steps` steps by the configured direction and step rule, from the columns as they are."""
        cfg, arch = self.config, session.arch
        scale = cfg.lr
        for step in range(cfg.steps):
            session.check_cancel()
            session.report(f"step {step + 1}/{cfg.steps}: {int(steered.sum())} token(s) to fix", step / cfg.steps)
            with session.trainable(layers) as params:
                now = self._forward(session, problem, layers)
                if torch.equal(now.predicted, problem.target):
                    return True
                now.loss.backward()
                grads = {l: arch.as_columns(l, W.grad)[:, neurons[l]].clone() for l, W in zip(layers, params)}
            loss = float(now.loss.detach())
            Z = {l: now.rows[l][:, neurons[l]] for l in layers}
            steps = self._directions(Z, S, grads, steered, metrics, loss)
            if cfg.step_rule == "minimal":
                outcome = self._minimal_step(session, problem, layers, neurons, steps, loss)
                if outcome is not False:
                    return bool(outcome)
                continue
            scale = self._take_step(session, problem, layers, neurons, steps, scale, loss)
            if scale is None:
                return False
        with torch.no_grad():
            return torch.equal(self._forward(session, problem, []).predicted, problem.target)

    def _directions(self, Z, S, grads, steered, metrics, loss) -> dict[int, torch.Tensor]:
        """The step direction of every layer: the prior, the gradient or the paper's |P| * -sign(G), realised
        again with the least change on normal code when a metric protects it."""
        cfg = self.config
        if cfg.direction == "natural":
            return natural_direction(grads, metrics, loss)
        P = {l: protected_prior(Z[l], S, metrics[l]) for l in Z}
        if cfg.direction == "prior":
            return P
        D = {l: seme_direction(P[l], grads[l]) if cfg.direction == "seme" else -grads[l] for l in Z}
        if all(metrics[l].inverse is None for l in Z):
            return D
        return {l: realise(D[l], Z[l], steered, metrics[l]) for l in Z}

    def _take_step(self, session, problem, layers, neurons, steps, scale, loss) -> float | None:
        """W += scale * step. Backtracking keeps it only if the loss drops (else halves the scale and
        retries, restoring the columns exactly); returns the next scale, None when no scale helped."""
        cfg, arch = self.config, session.arch
        if cfg.step_rule == "fixed":
            self._add(arch, layers, neurons, steps, scale)
            return scale
        saved = {l: arch.columns(l)[:, neurons[l]].clone() for l in layers}
        for _ in range(cfg.backtracks + 1):
            self._add(arch, layers, neurons, steps, scale)
            with torch.no_grad():
                if float(self._forward(session, problem, []).loss) < loss:
                    return min(scale * 2, cfg.lr * _MAX_SCALE)
            with torch.no_grad():
                for l in layers:
                    arch.columns(l)[:, neurons[l]] = saved[l]
            scale /= 2
        return None

    @torch.no_grad()
    def _minimal_step(self, session, problem, layers, neurons, steps, loss) -> bool | None:
        """W = W0 + a * step with the smallest scale a that fixes every target with the margin (and lowers
        the loss): True. No scale fixes: the scale with the lowest loss, if lower than now: False (step
        taken, go on). Nothing lowers the loss: the columns restored exactly, None."""
        cfg, arch = self.config, session.arch
        saved = {l: arch.columns(l)[:, neurons[l]].clone() for l in layers}

        def trial(scale: float) -> tuple[bool, float]:
            for l in layers:
                arch.columns(l)[:, neurons[l]] = saved[l] + scale * steps[l]
            now = self._forward(session, problem, [])
            return now.margin >= cfg.margin and float(now.loss) < loss, float(now.loss)

        low, high, best = 0.0, None, (None, loss)
        for unit in _SCALES:
            fixed, trial_loss = trial(cfg.lr * unit)
            if fixed:
                high = cfg.lr * unit
                break
            low = cfg.lr * unit
            if trial_loss < best[1]:
                best = (low, trial_loss)
        if high is not None:
            for _ in range(cfg.bisections):
                mid = (low + high) / 2
                if trial(mid)[0]:
                    high = mid
                else:
                    low = mid
            trial(high)
            return True
        if best[0] is not None:
            trial(best[0])
            return False
        for l in layers:
            arch.columns(l)[:, neurons[l]] = saved[l]
        return None

    def _least_change(self, session, problem, layers, neurons, metrics, start: "_Start", origin) -> bool:
        """Gauss-Newton on the soft margins (smooth, and never above the hard ones). Each step re-solves the
        whole patch as the least change on normal code that gives every target near or under the margin the
        margin, to first order (so a step also drops what earlier steps no longer need), and moves towards it
        (halved up to `backtracks` times until the total soft shortfall shrinks). When no such move helps,
        the step adds that least change to the patch instead (plain Gauss-Newton, which always makes progress
        near a solution). Fixed means every target the argmax by the margin; then up to `polish` more
        re-solves, each kept only while the fix holds. The patch is measured from `origin`, the columns
        before the repair (the columns as they are may already hold an earlier round's patch)."""
        cfg = self.config
        saved = origin
        patch = {l: session.arch.columns(l)[:, neurons[l]] - saved[l] for l in layers}
        wanted, floor = self._margin_targets(problem, start)
        fixed = lambda logits: bool((target_leads(logits, problem.target) >= floor).all())
        polished = 0
        for step in range(cfg.steps + cfg.polish):
            session.check_cancel()
            session.report(f"step {step + 1}: least change", min(1.0, step / cfg.steps))
            logits, margins, J, constrained = self._margin_jacobian(session, problem, layers, neurons, wanted)
            reached = fixed(logits)
            if reached and polished >= cfg.polish or not reached and step >= cfg.steps or not len(constrained):
                break
            polished += reached
            now = _shortfall(margins, wanted)
            shortfall = wanted[constrained] + _OVERSHOOT - margins[constrained]
            accept = fixed if reached else \
                (lambda after: _shortfall(_soft_margins(after, problem.target), wanted) < now)
            whole = least_change_patch(J, metrics, shortfall, patch)
            kept = self._try_towards(session, problem, layers, neurons, saved, patch, whole, accept)
            if kept is None and not reached:
                added = least_change_patch(J, metrics, shortfall, {l: torch.zeros_like(p) for l, p in patch.items()})
                kept = self._try_towards(session, problem, layers, neurons, saved, patch,
                                         {l: patch[l] + added[l] for l in layers}, accept)
            if kept is None:
                break
            patch = kept
        with torch.no_grad():
            return fixed(self._logits(session, problem))

    def _margin_targets(self, problem: _Problem, start: "_Start") -> tuple[torch.Tensor, torch.Tensor]:
        """Per position, the soft margin to reach or hold and the hard margin that counts as fixed: for a
        new target `margin`, both; for an earlier fix (keep row), its allowance (`_keep_targets`)."""
        wanted = torch.full((len(problem.target),), self.config.margin)
        floor = wanted.clone()
        k = problem.kept
        wanted[k], floor[k] = _keep_targets(start.lead[k], start.soft[k], self.config.margin)
        return wanted, floor

    def _try_towards(self, session, problem, layers, neurons, saved, patch, wanted, accept):
        """patch + a (wanted - patch) for a = 1, 1/2, ... (`backtracks` halvings): the first one whose soft
        margins `accept` takes, left applied; None (the columns back at patch) when none does."""
        scale = 1.0
        for _ in range(self.config.backtracks + 1):
            trial = {l: patch[l] + scale * (wanted[l] - patch[l]) for l in layers}
            self._set(session.arch, layers, neurons, saved, trial)
            with torch.no_grad():
                if accept(self._logits(session, problem)):
                    return trial
            scale /= 2
        self._set(session.arch, layers, neurons, saved, patch)
        return None

    @staticmethod
    def _margin_jacobian(session, problem, layers, neurons, wanted):
        """The logits and soft margins at every predicting position, and for the positions within `_BAND` of
        their wanted margin (or under it) the gradient of each soft margin with respect to the patchable
        columns: {layer: (n, d, k)}. By the chain rule through y = W z, that gradient is sum_t g_t z_t[cols]^T
        with g_t the margin's gradient at the projection's output: one batched backward pass per sequence
        (through that sequence only) gives every position's g, and the full (d, d_ff) weight gradient is
        never formed."""
        logits, margins, constrained, J = [], [], [], {l: [] for l in layers}
        sizes = [len(range(ids.shape[1])[span]) for ids, span in zip(problem.inputs, problem.spans)]
        start = 0
        with torch.enable_grad(), record_projections(session.arch, layers) as io:
            for ids, span, target in zip(problem.inputs, problem.spans, problem.target.split(sizes)):
                seq_logits = _span_logits(session.lm.model, ids, span)
                seq_margins = _soft_margins(seq_logits, target)
                rows = (seq_margins.detach() < wanted[start : start + len(target)] + _BAND).nonzero().flatten()
                if len(rows):
                    seeds = torch.eye(len(target))[rows]
                    outputs = torch.autograd.grad(seq_margins, [io[l][1] for l in layers], grad_outputs=seeds,
                                                  is_grads_batched=True)
                    for l, g in zip(layers, outputs):
                        J[l].append(torch.einsum("ntd,tk->ndk", g[:, 0], io[l][0][0][:, neurons[l]]))
                logits.append(seq_logits.detach())
                margins.append(seq_margins.detach())
                constrained.append(rows + start)
                start += len(target)
        d = session.arch.d_model
        J = {l: torch.cat(rows) if rows else torch.empty(0, d, len(neurons[l])) for l, rows in J.items()}
        return torch.cat(logits), torch.cat(margins), J, torch.cat(constrained)

    @staticmethod
    def _logits(session, problem) -> torch.Tensor:
        return _problem_logits(session.lm.model, problem.inputs, problem.spans)

    @staticmethod
    @torch.no_grad()
    def _set(arch, layers, neurons, saved, patch) -> None:
        for l in layers:
            arch.columns(l)[:, neurons[l]] = saved[l] + patch[l]

    @staticmethod
    @torch.no_grad()
    def _add(arch, layers, neurons, steps, scale) -> None:
        for l in layers:
            arch.columns(l)[:, neurons[l]] += scale * steps[l]

    # -- locating -----------------------------------------------------------------------------------

    def _layers(self, session: RepairSession, problem: _Problem) -> list[int]:
        cfg = self.config
        if cfg.layer_ratio >= 1.0 and cfg.sparsity != "layer":
            return list(range(session.arch.n_layers))
        ids, span = problem.inputs[0], problem.spans[0]
        context = ids[0, : span.start + 1].tolist()
        losses = ffn_skip_losses(session.lm, context, int(problem.target[0]))
        if cfg.sparsity == "layer":
            return [int(losses.argmax())]
        return top_layers(losses, cfg.layer_ratio)

    def _neurons(self, session, problem, layers, first: _Pass, steered) -> dict[int, torch.Tensor]:
        cfg, d_ff = self.config, session.arch.d_ff
        if cfg.sparsity == "none":
            return {l: torch.arange(d_ff) for l in layers}
        if cfg.sparsity == "contrast":
            stat = corpus_statistic(session.lm)
            active = {l: first.rows[l][steered] for l in layers}
            return contrast_neurons(active, {l: stat.diag(l) for l in layers}, cfg.neurons)
        if cfg.sparsity in ("fisher", "greedy"):
            stat = corpus_statistic(session.lm)
            with session.trainable(layers) as params:
                self._forward(session, problem, layers).loss.backward()
                # No copy: the gradients outlive `trainable` (which only drops the parameters' references).
                grads = {l: session.arch.as_columns(l, W.grad) for l, W in zip(layers, params)}
            if cfg.sparsity == "fisher":
                diag = {l: stat.diag(l) for l in layers}
                floor = {l: d + cfg.ridge * float(d.mean()) for l, d in diag.items()}
                return fisher_neurons(grads, floor, cfg.neurons, self._output_inverses(session, layers))
            column, diag = self._metric_columns(session, layers)
            return greedy_neurons(grads, column, diag, cfg.neurons)
        ids, span = problem.inputs[0], problem.spans[0]
        first_wrong = int(steered.nonzero()[0])
        context = ids[0, : span.start + first_wrong + 1].tolist()
        scores = neuron_scores(session.lm, context, int(problem.target[first_wrong]), layers)
        best = layers[0] if cfg.sparsity == "layer" else None
        masks = neuron_masks(scores, cfg.sparsity, cfg.sparsity_ratio, best)
        return {l: m.nonzero().flatten() for l, m in masks.items() if bool(m.any())}

    def _metric_columns(self, session: RepairSession, layers: list[int]):
        """Q_l[:, j] on demand and diag Q_l, for the dense covariance metric of `protected_metric` (the
        corpus, the earlier fixes' rows, the ridge), without forming the d_ff x d_ff matrices."""
        cfg, stat = self.config, corpus_statistic(session.lm)
        keep = self._keep_rows(session, layers) if cfg.keep_weight > 0 else {}
        weight = {l: cfg.keep_weight / len(keep[l]) for l in keep if len(keep[l])}
        diag = {l: stat.diag(l) + (weight[l] * keep[l].pow(2).sum(0) if l in weight else 0) for l in layers}
        ridge = {l: cfg.ridge * float(diag[l].mean()) for l in layers}

        def column(l: int, j: int) -> torch.Tensor:
            c = stat.column(l, j)
            if l in weight:
                c += weight[l] * (keep[l].T @ keep[l][:, j])
            c[j] += ridge[l]
            return c

        return column, {l: diag[l] + ridge[l] for l in layers}

    def _metrics(self, session: RepairSession, neurons: dict[int, torch.Tensor]) -> dict[int, Metric]:
        cfg = self.config
        outputs = self._output_inverses(session, sorted(neurons)) or {}
        if cfg.protect == "none":
            return {l: Metric(None, outputs.get(l)) for l in neurons}
        stat = corpus_statistic(session.lm)
        keep = self._keep_rows(session, sorted(neurons)) if cfg.keep_weight > 0 else {}
        return {
            l: replace(protected_metric(stat.block(l, idx), cfg.protect, ridge=cfg.ridge,
                                        threshold=cfg.nullspace_threshold,
                                        keep=keep[l][:, idx] if l in keep else None, keep_weight=cfg.keep_weight),
                       output_inverse=outputs.get(l))
            for l, idx in neurons.items()
        }

    def _output_inverses(self, session: RepairSession, layers: list[int]) -> dict[int, torch.Tensor] | None:
        """R_l⁻¹ per layer (output_metric=fisher), else None."""
        if self.config.output_metric == "none":
            return None
        fisher = output_fisher(session.lm)
        return {l: fisher.inverse(l, self.config.output_ridge) for l in layers}

    @staticmethod
    @torch.no_grad()
    def _keep_rows(session: RepairSession, layers: list[int]) -> dict[int, torch.Tensor]:
        """Activations at every predicting position of every earlier fix (the stack's stored cases)."""
        if not session.protect:
            return {}
        rows = {l: [] for l in layers}
        with record_activations(session.arch, layers) as acts:
            for enc in session.protect:
                session.lm.model(input_ids=torch.tensor([list(enc.ids)]), logits_to_keep=1)   # activations only
                span = slice(len(enc.prompt_ids) - 1, len(enc.ids) - 1)
                for l in layers:
                    rows[l].append(acts[l][0, span])
        return {l: torch.cat(r) for l, r in rows.items()}
