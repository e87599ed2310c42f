"""The adaptive controller: at each decision point, continue, prune, widen, deepen or stop.

The procedure bonsai comes from: train the network from the first epoch, prune while training, train until one
more epoch no longer improves, then look at how much was pruned in the last epochs to decide whether the network
should become wider or deeper, and continue. :func:`decide` is that rule as a pure function of a few signals, so it
can be tested on scripted histories; the engine turns its decisions into surgery and logs each with its reason.

The rule, in order (the first that applies wins):

1. **Over the FLOP target** (``flops > target * (1 + flops_tolerance)``): ``prune``. In the sizing phase the
   scheduled penalty is already removing channels; after it, the engine shrinks the network to the target at once
   (its weakest blocks first, then its widths: ``adapt.shed_blocks``).
2. **Well under the FLOP target in the sizing phase** (``flops * widen_factor**2 <= target``, a growth still
   allowed): ``widen`` every stage to the target (MorphNet's expand step with Net2WiderNet, ``to_target``). The
   network has learned for an epoch; growing it now keeps that work and leaves the rest of the run to the size the
   target affords, where waiting for a plateau would spend the run's most useful epochs on a network too small.
3. **Still improving** (the best validation accuracy of the last ``plateau_epochs`` epochs beats the best before
   them by more than ``min_delta``), or too few epochs to tell: ``continue``. The engine passes only the epochs
   since the last growth: growth keeps the function, so the plateau before it would carry straight over.
4. On a plateau, **too little time left** for a surgery to pay off (``left < min_left``): ``stop``; under a time
   budget ``continue`` (its schedule anneals the learning rate to the end, where most of the accuracy comes).
5. **Overfitting** (train accuracy above validation accuracy by more than ``max_gap``): ``prune``. The network has
   more capacity than the data supports. Read only from an epoch trained at the working size: a network trained
   at a lower resolution validates worse at the full one, which is no sign of overfitting.
6. **Nothing to read** (and growth still allowed): not every epoch of the last ``window`` applied the pruning
   penalty, so how much the stages use their width is unknown: ``prune`` (for ``window`` epochs), and decide on
   what it removes. (A lasso that has run for one epoch has not yet had the time to empty a channel; that nothing
   was removed then says nothing.) Growth is allowed while fewer than ``max_growths`` growths were made and the
   smallest growth (a block, about ``1 / stages`` more FLOPs) stays within the target.
7. **Saturated stages**: a stage whose share of channels pruned in the last ``window`` epochs is below
   ``saturated`` uses all its width: ``widen`` those stages (by ``widen_factor``), if the result stays within the
   FLOP target and growth is allowed.
8. **Width to spare everywhere** (every stage pruned at least ``saturated``) but no progress: the network needs
   depth, not width: ``deepen`` the stage that was pruned least, under the same conditions.
9. Otherwise ``stop`` (``continue`` under a time budget, as in 4): plateaued, and no growth is allowed.

Growth is estimated here (``widen_factor`` squared for widening); the engine checks the exact FLOPs of the grown
network before carrying it out, and when they exceed the target it stops instead (continues under a time budget).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ACTIONS = ("continue", "prune", "widen", "deepen", "stop")


@dataclass
class Signals:
    """What the controller sees at a decision point.

    Attributes:
        val_acc: validation accuracy of every epoch so far (since the last growth), oldest first.
        train_acc: training accuracy of the same epochs (on augmented batches); None for an epoch that did not end
            at the working size (progressive resizing), whose accuracy is not comparable with validation's.
        pruned_share: per stage, the share of its channels removed in the last ``window`` epochs (0..1); None unless
            every one of those epochs applied the pruning penalty.
        flops: forward FLOPs per image of the network now.
        left: share of the run still ahead (of the budget or of the planned epochs), 0..1.
        growths: widen/deepen decisions taken so far.
        target_flops: the FLOP target (the user's, or what a time budget affords), or None.
        sizing: whether the run is in its sizing phase (``adapt.sizing``, with a target only), in which the network
            is moved to the target's size.
        anneals: whether a time budget's schedule runs to its end (a plateau is then no reason to stop).
        stages: the network's number of stages.
    """

    val_acc: list[float]
    train_acc: list[float | None]
    pruned_share: list[float] | None
    flops: float
    left: float
    growths: int = 0
    target_flops: float | None = None
    sizing: bool = False
    anneals: bool = False
    stages: int = 3


@dataclass
class Rule:
    """The controller's thresholds (``adapt.*`` config keys)."""

    plateau_epochs: int = 2
    min_delta: float = 0.002
    min_left: float = 0.2
    max_gap: float = 0.15
    saturated: float = 0.05
    widen_factor: float = 1.5
    max_growths: int = 3
    flops_tolerance: float = 0.02


@dataclass
class Decision:
    action: str
    reason: str
    stages: list[int] = field(default_factory=list)
    to_target: bool = False  # widen: to the FLOP target (MorphNet's expand step), not by widen_factor

    def event(self) -> dict:
        return {"decision": self.action, "stages": self.stages, "reason": self.reason, "to_target": self.to_target}


def plateaued(val_acc: list[float], epochs: int, min_delta: float) -> bool:
    """True when the last ``epochs`` epochs' best validation accuracy does not beat the earlier best by more than
    ``min_delta`` (False while there are not more than ``epochs`` epochs)."""
    if len(val_acc) <= epochs:
        return False
    return max(val_acc[-epochs:]) <= max(val_acc[:-epochs]) + min_delta


def decide(s: Signals, rule: Rule = Rule()) -> Decision:
    """The decision for signals ``s`` under ``rule`` (see the module docstring)."""
    target = s.target_flops
    tol = 1 + rule.flops_tolerance
    if target is not None and s.flops > target * tol:
        return Decision("prune", f"{s.flops / 1e6:.1f}M FLOPs per image, above the target {target / 1e6:.1f}M")
    # the smallest growth (a block adds about a stage's share of FLOPs) must fit within the target
    room = target is None or s.flops * (1 + 1 / max(s.stages, 1)) <= target * tol
    can_grow = s.growths < rule.max_growths and room
    if s.sizing and target is not None and can_grow and s.flops * rule.widen_factor**2 <= target * tol:
        return Decision(
            "widen",
            f"{s.flops / 1e6:.1f}M FLOPs per image, well under the target {target / 1e6:.1f}M: grow every stage to it now",
            list(range(s.stages)),
            to_target=True,
        )
    if len(s.val_acc) <= rule.plateau_epochs:
        return Decision("continue", "too few epochs (since the start or the last growth) to judge a plateau")
    if not plateaued(s.val_acc, rule.plateau_epochs, rule.min_delta):
        return Decision("continue", "validation accuracy still improving")
    best = max(s.val_acc)
    if s.left < rule.min_left:
        if s.anneals:
            return Decision("continue", f"plateau at {best:.2%} with {s.left:.0%} of the budget left: its schedule anneals to the end")
        return Decision("stop", f"plateau at {best:.2%} with {s.left:.0%} of the run left, too little for a surgery to pay off")
    gap = None if not s.train_acc or s.train_acc[-1] is None else s.train_acc[-1] - s.val_acc[-1]
    if gap is not None and gap > rule.max_gap:
        return Decision("prune", f"plateau with train accuracy {gap:.1%} above validation: more capacity than the data supports")
    if s.pruned_share is None and can_grow:
        return Decision("prune", "plateau, and the penalty has not run through the last epochs: prune to see which stages use their width")
    saturated = [i for i, p in enumerate(s.pruned_share or []) if p < rule.saturated]
    if can_grow and saturated:
        grown = s.flops * rule.widen_factor**2  # conv FLOPs grow about with the square of the widths
        if target is None or grown <= target * tol:
            shares = ", ".join(f"stage {i}: {s.pruned_share[i]:.0%}" for i in saturated)
            return Decision("widen", f"plateau, and pruning left these stages nearly whole ({shares}): they use their width", saturated)
    if can_grow and s.pruned_share and not saturated:
        stage = min(range(len(s.pruned_share)), key=lambda i: s.pruned_share[i])
        return Decision("deepen", f"plateau with width to spare in every stage (least pruned: stage {stage}, {s.pruned_share[stage]:.0%}): add depth", [stage])
    why = "no more growth allowed" if s.growths >= rule.max_growths else "growing would exceed the FLOP target"
    if s.anneals:
        return Decision("continue", f"plateau at {best:.2%}; {why}; the budget's schedule anneals to its end")
    return Decision("stop", f"plateau at {best:.2%}; {why}")
