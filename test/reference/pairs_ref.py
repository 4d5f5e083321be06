"""Pairs fixtures: class similarity and negative-class probabilities computed with numpy.

Usage: python test/reference/pairs_ref.py OUTDIR

Follows the official DIPSY code: calculate_similarity_matrix.py (class vector = mean of the
projected image embeddings of the class's shots, S = sklearn cosine_similarity, which normalises
the rows and takes dot products) and manage.py _build_probability_matrix (scipy softmax of S / tau
over each row, diagonal set to 0, rows renormalised). sklearn and scipy are not installed here, so
both are written out in numpy, in float64.

Writes OUTDIR/cases.json:
  "similarity": [{"name", "tau", "similarity": [[K x K]], "expected": [[K x K]]}]
      expected[k][j] = P(j | k), expected[k][k] = 0
  "embeddings": {"embeddings": [[[n_k x D]] per class] (float32 values), "expected": [[K x K]]}
"""

import json
import os
import sys

import numpy as np


def softmax_rows(x):
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def probability_matrix(similarity, tau):
    p = softmax_rows(np.asarray(similarity, dtype=np.float64) / tau)
    np.fill_diagonal(p, 0)
    p /= p.sum(axis=1, keepdims=True)
    return p


def cosine_similarity(x):
    unit = x / np.sqrt((x * x).sum(axis=1, keepdims=True))
    return unit @ unit.T


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    rng = np.random.RandomState(7)

    s3 = np.array([[1.0, 0.5, 0.1], [0.5, 1.0, 0.3], [0.1, 0.3, 1.0]])
    s4 = np.array([
        [1.0, 0.82, 0.61, 0.40],
        [0.82, 1.0, 0.77, 0.35],
        [0.61, 0.77, 1.0, 0.58],
        [0.40, 0.35, 0.58, 1.0],
    ])
    feats = rng.randn(9, 16)
    s9 = cosine_similarity(feats)
    cases = []
    for name, s in [("3x3", s3), ("4x4", s4), ("9x9-random", s9)]:
        for tau in [0.4, 0.1, 1.0, 0.002]:
            cases.append({
                "name": name,
                "tau": tau,
                "similarity": s.tolist(),
                "expected": probability_matrix(s, tau).tolist(),
            })

    shots = [3, 1, 4, 2, 5]
    dim = 12
    offsets = rng.randn(len(shots), dim) * 2.0
    per_class = [
        (offsets[k] + rng.randn(n, dim)).astype(np.float32) for k, n in enumerate(shots)
    ]
    means = np.stack([e.astype(np.float64).mean(axis=0) for e in per_class])
    embeddings = {
        "embeddings": [e.astype(np.float64).tolist() for e in per_class],
        "expected": cosine_similarity(means).tolist(),
    }

    with open(os.path.join(outdir, "cases.json"), "w") as f:
        json.dump({"similarity": cases, "embeddings": embeddings, "numpy": np.__version__}, f)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: pairs_ref.py OUTDIR")
    main(sys.argv[1])
