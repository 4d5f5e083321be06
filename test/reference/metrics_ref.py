"""Evaluation metrics fixtures: scikit-learn on random class scores.

Usage: python test/reference/metrics_ref.py OUTDIR

For each case (scores [N, K] and true labels), what scikit-learn 1.9 computes: accuracy_score of
the argmax predictions (np.argmax: the first highest score), top_k_accuracy_score with
k = min(5, K), confusion_matrix over every class, recall_score per class (NaN for a class without
true images) and balanced_accuracy_score (the mean recall over classes with true images). The
cases have a class without images, a class never predicted, fewer than five classes, and tied
scores (integers in a small range), where both libraries' tie rules show.

Writes OUTDIR/cases.json: {"cases": [{"name", "classes", "scores" (flat, row-major), "labels",
"expected": {"accuracy", "k", "top_k", "confusion", "recall", "balanced_accuracy"}}], "sklearn"}
"""

import json
import os
import sys
import warnings

import numpy as np
import sklearn
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    recall_score,
    top_k_accuracy_score,
)

warnings.filterwarnings("ignore")  # sklearn warns about the degenerate cases on purpose


def case(name, scores, labels):
    n, k = scores.shape
    classes = list(range(k))
    pred = np.argmax(scores, axis=1)
    top = min(5, k)
    recall = recall_score(labels, pred, labels=classes, average=None, zero_division=np.nan)
    return {
        "name": name,
        "classes": k,
        "scores": scores.reshape(-1).tolist(),
        "labels": labels.tolist(),
        "expected": {
            "accuracy": float(accuracy_score(labels, pred)),
            "k": top,
            "top_k": float(top_k_accuracy_score(labels, scores, k=top, labels=classes)),
            "confusion": confusion_matrix(labels, pred, labels=classes).tolist(),
            "recall": [None if np.isnan(r) else float(r) for r in recall],
            "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
        },
    }


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.default_rng(14)
    cases = []

    # 7 classes, imbalanced; class 6 has no images, class 5 is never predicted.
    labels = rng.choice(6, size=300, p=[0.3, 0.25, 0.2, 0.1, 0.1, 0.05])
    scores = rng.normal(size=(300, 7)) + 1.5 * np.eye(7)[labels]
    scores[:, 5] -= 10
    cases.append(case("imbalanced-7", scores, labels))

    # Fewer classes than five: top-k is over all of them.
    labels = rng.integers(0, 3, size=50)
    cases.append(case("three-classes", rng.normal(size=(50, 3)), labels))

    # Many classes, noisy: top-5 well above top-1.
    labels = rng.integers(0, 40, size=400)
    scores = rng.normal(size=(400, 40)) + 0.8 * np.eye(40)[labels]
    cases.append(case("forty-classes", scores, labels))

    # Ties: integer scores in 0..3.
    labels = rng.integers(0, 8, size=200)
    scores = rng.integers(0, 4, size=(200, 8)).astype(np.float64)
    cases.append(case("ties", scores, labels))

    with open(os.path.join(outdir, "cases.json"), "w") as f:
        json.dump({"cases": cases, "sklearn": sklearn.__version__}, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: metrics_ref.py OUTDIR")
    main(sys.argv[1])
