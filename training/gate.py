"""The promotion gate: does a challenger beat the champion on the frozen test split, and would
it change too many of the archive's labels to be promoted without a person looking?"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from training.churn import Churn
from training.evaluate import Evaluation

Metric = Literal["macro_f1", "accuracy"]


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    # Better by the gate but not promoted: left a candidate for a person to promote by hand.
    held: bool = False


def metric_value(evaluation: Evaluation, metric: Metric) -> float:
    return evaluation.macro["f1"] if metric == "macro_f1" else evaluation.accuracy


def decide(
    challenger: Evaluation,
    champion: Evaluation | None,
    *,
    metric: Metric,
    margin: float,
    max_recall_drop: float,
) -> Decision:
    """Promote only if `metric` improves by at least `margin` (and at all) and no class's recall
    falls by more than `max_recall_drop`; otherwise say which rule refused it."""
    new = metric_value(challenger, metric)
    if champion is None:
        return Decision(True, f"no champion to beat; {metric} {new:.4f}")
    if challenger.class_names != champion.class_names:
        return Decision(
            False,
            f"classes differ from the champion's ({challenger.class_names} vs "
            f"{champion.class_names}); promote by hand with `emolabel models promote`",
        )
    old = metric_value(champion, metric)
    if not (new > old and new - old >= margin):
        return Decision(
            False,
            f"{metric} {new:.4f} does not beat the champion's {old:.4f} by the margin {margin}",
        )
    for name in challenger.class_names:
        before = champion.per_class[name]["recall"]
        after = challenger.per_class[name]["recall"]
        if before - after > max_recall_drop:
            return Decision(
                False,
                f"recall of {name!r} falls from {before:.4f} to {after:.4f}, more than "
                f"{max_recall_drop}",
            )
    return Decision(
        True,
        f"{metric} {new:.4f} beats the champion's {old:.4f} by {new - old:.4f} (margin "
        f"{margin}); no class recall falls more than {max_recall_drop}",
    )


def hold_for_churn(
    decision: Decision, churn: Churn | None, *, max_churn: float, challenger_version: str
) -> Decision:
    """Hold a promotion whose label churn on the archive sample is over `max_churn`; any other
    decision (or no churn measured) stands as it is."""
    if not decision.promote or churn is None or churn.rate <= max_churn:
        return decision
    return Decision(
        False,
        f"held: {churn.changed} of {churn.sample} sampled archive labels would change "
        f"({churn.rate:.1%}), more than EMOLABEL_RETRAIN__MAX_CHURN {max_churn:.1%}; the gate "
        f"had said: {decision.reason}; check the churn (`emolabel models diff`) and promote by "
        f"hand with `emolabel models promote {challenger_version}`",
        held=True,
    )
