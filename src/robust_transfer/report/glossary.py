"""Every term a user meets in a report, once: the report links its column headings here and
the documentation's glossary page is rendered from the same entries."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Term:
    name: str
    text: str  # Markdown
    columns: tuple[str, ...] = ()  # the report's column headings this term explains

    @property
    def anchor(self) -> str:
        return "g-" + re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")


GLOSSARY: tuple[Term, ...] = (
    Term(
        "encoder",
        "The pretrained feature map `f: [0, 1]^d -> R^k` being judged, frozen unless an "
        "adaptation fine-tunes it. Its *pretraining* (standard, adversarial, SimCLR, "
        "1-Lipschitz, or a zoo's checkpoint) is recorded beside its name.",
        ("encoder", "pretraining"),
    ),
    Term(
        "task",
        "A downstream data set the heads are trained and evaluated on, named as "
        "`task:NAME` for the built-in ones or by the data files a user gives.",
        ("task",),
    ),
    Term(
        "adaptation",
        "How the encoder is put to the task: `linear-probe` (a linear head on frozen "
        "features), `finetune`, `lp-ft` (probe, then fine-tune), `anchored-finetune`, "
        "`partial-finetune`, `bitfit` (biases only) and `lora` (low-rank adapters), or "
        "`certified-probe` (a linear head trained for margins above a certified shift); "
        "each of the others clean or adversarial (trained against PGD or TRADES).",
        ("adaptation",),
    ),
    Term(
        "threat",
        "The threat model: perturbations `delta` with `‖delta‖_p <= eps` in the "
        "Linf or L2 norm, inputs kept inside `[0, 1]`.",
        ("threat", "eps"),
    ),
    Term(
        "unit",
        "One (encoder, task, adaptation, threat, eps) combination of a study: one row of "
        "its results and of the report's tables.",
    ),
    Term(
        "shard",
        "A contiguous slice of a unit's evaluation points, the smallest piece of work a "
        "study schedules, stores and resumes: many processes split a study by shards.",
    ),
    Term(
        "points",
        "How many evaluation points a number is computed on (AutoAttack runs on the first "
        "points of a unit only).",
        ("points",),
    ),
    Term(
        "clean accuracy",
        "The share of evaluation points the head classifies correctly without any perturbation.",
        ("clean",),
    ),
    Term(
        "PGD robust accuracy",
        "The share of points that projected gradient descent on the head's cross-entropy "
        "and targeted margins left correctly classified: an upper bound on the true "
        "robust accuracy. *PGD (all points)* is the same over every point of the unit.",
        ("PGD", "PGD (all points)"),
    ),
    Term(
        "attacked robust accuracy",
        "The share of points no attack broke: PGD on the head plus the task-agnostic "
        "perturbations that maximise the shift of the features. Attacks only ever find "
        "some of the adversarial points, so this is an upper bound on robust accuracy.",
        ("attacked", "probe attacked"),
    ),
    Term(
        "AutoAttack",
        'Robust accuracy under AutoAttack "standard" (APGD-CE, APGD-T, FAB-T, Square), the '
        "field's reference evaluation, run on the points PGD left robust. *PGD - "
        "AutoAttack* is how much it takes off PGD's robust accuracy on those points: a "
        "large gap means PGD's numbers are too optimistic for that encoder.",
        ("AutoAttack", "PGD - AutoAttack"),
    ),
    Term(
        "shift",
        "How far an input perturbation within the threat can move the features: "
        "`max ‖f(x + delta) - f(x)‖_2`, per point. *attacked shift* is the largest "
        "one an attack found (a lower bound), *certified shift* an upper bound from a "
        "certifier. The column is the mean attacked shift over the unit's points.",
        ("shift",),
    ),
    Term(
        "shift / feature scale",
        "The shift divided by the median distance between the features of two different "
        "inputs: how large the shift is against the scale of the representation.",
        ("shift / feature scale",),
    ),
    Term(
        "D(W)",
        "The head's largest weight-row gap `max_{i,j} ‖w_i - w_j‖_2`: how much a unit of "
        "shift can change any difference of two logits.",
        ("D(W)",),
    ),
    Term(
        "normalised margin",
        "`rho(x) = min_{j != yhat} (g_yhat(x) - g_j(x)) / ‖w_yhat - w_j‖_2` for the head's "
        "logits `g = W f(x) + b` and predicted class `yhat`: the distance in feature space "
        "from `f(x)` to the head's decision boundary, how far the features may move "
        "before the prediction can change.",
    ),
    Term(
        "criterion",
        "The robust classification criterion: a point whose normalised margin exceeds its "
        "shift, `rho(x) > shift(x)`, keeps its prediction under every perturbation of the "
        "threat. With the attacked shift it is an estimate (*predicted*, *criterion*); "
        "with a certified shift it is a guarantee (*certified*).",
        ("predicted", "criterion"),
    ),
    Term(
        "loss bound",
        "The bound on the adversarial loss of a linear head: the clean cross-entropy plus "
        "`max_j ‖w_y - w_j‖ * shift`, averaged over points. *bound* uses the attacked "
        "shift (an estimate), *cert. bound* the certified shift (a guarantee); *adv loss* "
        "is the loss the attacks reached, *loss* and *clean loss* the regression losses, "
        "*exceeded* the share of points whose attacked loss passed the bound (must be 0 "
        "with a certified shift).",
        ("bound", "cert. bound", "adv loss", "loss", "clean loss", "exceeded"),
    ),
    Term(
        "certified robust accuracy",
        "The share of points the criterion holds for with a certified shift: a guarantee "
        "for every head on the encoder (task-agnostic). Certifiers: the layer-wise "
        "Lipschitz constant, interval bound propagation (IBP) and CROWN; *certifiers* "
        "lists those run, and each point takes the tightest.",
        ("certified", "task-agnostic cert.", "certifiers", "probe certified"),
    ),
    Term(
        "head-specific certified robust accuracy",
        "The share of points whose own head's margins are certified directly (CROWN "
        "through encoder and head, or the task-agnostic certificate where tighter), so "
        "never below the task-agnostic one: what the paper's encoder-only route gives up.",
        ("head cert.", "head-specific cert."),
    ),
    Term(
        "task-agnostic robust accuracy",
        "The share of points whose prediction survived the representation attack's "
        "perturbation, the one that maximises the shift of the features without "
        "looking at the head.",
        ("task-agn.",),
    ),
    Term(
        "cert./att. shift",
        "The median over points of certified shift divided by attacked shift: 1 would be "
        "exact, larger values measure how far the guarantee is from what attacks reach.",
        ("cert./att. shift",),
    ),
    Term(
        "distance kept",
        "The median, over pairs of evaluation inputs, of feature distance over input "
        "distance: an encoder with Lipschitz constant `L` keeps at most `L`.",
        ("distance kept",),
    ),
    Term(
        "expected robust accuracy",
        "The share of points a linear head classifies correctly and is expected to keep "
        "under the threat, from one profile of the encoder (its Jacobian along the "
        "feature directions, first order exact per threat model, a short attack for the "
        "points near the decision boundary): an estimate, never a guarantee, that needs "
        "no attack per head. *expected - attacked* is its error against the attacks.",
        ("expected", "expected - attacked", "probe expected"),
    ),
    Term(
        "directional share",
        "The median over points of the largest shift along one of the head's "
        "class-difference directions, divided by the attacked shift: only that component "
        "moves a margin, which is why the criterion (which uses the whole shift) is "
        "loose.",
        ("directional share",),
    ),
    Term(
        "band",
        "The points whose first-order drop is close to their margin (for the most "
        "threatened class, a drop between 0.9 and 1.1 times the margin, widened in steps "
        "of 0.1 while that changes an answer): the only ones the expected robust "
        "accuracy attacks.",
    ),
    Term(
        "robustness curve",
        "Expected robust accuracy as a function of eps, from 0 to the unit's eps. *curve "
        "area* is its mean over that range (1 for a head no perturbation can move).",
        ("curve area",),
    ),
    Term(
        "best adaptation",
        "Of the adaptations a study ran at one encoder, task and threat, the one whose head "
        "kept the highest attacked robust accuracy (ties: higher clean accuracy); *best "
        "attacked* and *best clean* are its accuracies.",
        ("best adaptation", "best attacked", "best clean"),
    ),
    Term(
        "recipe",
        "The adversarial recipe an adaptation is: `adversarial-probe` (a linear head "
        "trained against the attack through the frozen encoder), `roli` (that probe "
        "starts adversarial fine-tuning; Hua et al., 2024) or `adversarial-finetune` (from "
        "a random head). *trained against* gives the adversary, threat, attack steps and "
        "eps warm-up (the share of the steps over which eps rises from 0).",
        ("recipe", "trained against"),
    ),
    Term(
        "cost",
        "What training a head (and its encoder) took: images through the encoder, forward "
        "plus backward passes (features a study computed once for all its probes are not "
        "counted), and *train s*, its seconds.",
        ("cost (images)", "train s"),
    ),
    Term(
        "Pareto front",
        "Among the heads of one encoder, task and threat, those that no other head beats "
        "at once on clean accuracy, attacked robust accuracy and cost: *Pareto* says "
        "whether a head is on it.",
        ("Pareto",),
    ),
    Term(
        "advice",
        "Before any fine-tuning, a clean and a cheap adversarial linear probe are trained "
        "and attacked on held-out training points: *linear reach* is the robust accuracy "
        "the adversarial one kept. Keeping 80% of its clean accuracy or more advises the "
        "adversarial probe (fine-tuning predicted to destroy robustness), 50% or more "
        "RoLI, less adversarial fine-tuning (both predicted to add it). *held* says whether "
        "a head of the advised recipe reached the Pareto front.",
        ("advised", "linear reach", "fine-tuning", "held"),
    ),
    Term(
        "AutoAttack flag",
        "The head's PGD robust accuracy exceeds AutoAttack's on the same points by more "
        "than 3 points: PGD overstates its robustness.",
        ("AA flag",),
    ),
    Term(
        "sanity checks",
        "Per-point checks on every unit that gradient attacks can be trusted: a zero or "
        "non-finite gradient, a randomised output, or a point only the black-box Square "
        "attack broke. *points that tripped* counts them per check.",
        ("points that tripped",),
    ),
    Term(
        "collapsed",
        "The head predicts one class everywhere, so its robust and certified accuracies "
        "are only the majority class's share.",
        ("collapsed",),
    ),
)


def term_of_column(title: str) -> Term | None:
    """The glossary entry a report column heading links to."""
    return next((term for term in GLOSSARY if title in term.columns), None)


def markdown() -> str:
    """The glossary as Markdown, each term under its own anchor."""
    return "\n\n".join(
        f'<a id="{term.anchor}"></a>**{term.name}**: {term.text}' for term in GLOSSARY
    )
