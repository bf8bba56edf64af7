"""Plain-numpy versions of SPEC's equations, written from SPEC.md (never by calling the JAX code)."""

import numpy as np


def l2n(x, axis=-1):
    return x / np.linalg.norm(x, axis=axis, keepdims=True)


def head_forward(x, P, Q, E, gamma, beta, cls_index):
    """x [B, h, w, D] -> logits, score [B, h, w, N], embed [B, h, w, D] (SPEC 1.3)."""
    xp = l2n(x @ P)
    ec = l2n(E[cls_index] @ Q)
    s = np.einsum("bhwd,nd->bhwn", xp, ec)
    z = gamma * (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-5) + beta
    return z, s, xp


def bilinear_matrix(n_in, n_out):
    """PyTorch bilinear, align_corners=False, no antialias, as an [n_out, n_in] matrix."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def upsample(logits, out_hw):
    """[B, h, w, N] -> [B, H, W, N] bilinear."""
    mh = bilinear_matrix(logits.shape[1], out_hw[0])
    mw = bilinear_matrix(logits.shape[2], out_hw[1])
    return np.einsum("Hh,bhwn,Ww->bHWn", mh, logits, mw)


def log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def seg_ce(logits, labels, normalize="all_pixels"):
    """Mean over all B*H*W pixels (ignored ones count in the denominator) (SPEC 2.2)."""
    total, valid = 0.0, 0
    lsm = log_softmax(logits)
    for b, i, j in np.ndindex(labels.shape):
        if labels[b, i, j] >= 0:
            total -= lsm[b, i, j, labels[b, i, j]]
            valid += 1
    return total / (labels.size if normalize == "all_pixels" else max(valid, 1))


def image_level_ce(logits, labels):
    """Loop over (b, l) pairs; other present labels deleted from the softmax (SPEC 2.3)."""
    ces = []
    for b in range(labels.shape[0]):
        present = sorted(set(labels[b].ravel().tolist()) - {-1})
        zbar = logits[b].mean(axis=(0, 1))
        for l in present:
            keep = [c for c in range(zbar.shape[0]) if c == l or c not in present]
            ces.append(-log_softmax(zbar[keep])[keep.index(l)])
    return (sum(ces) / len(ces) if ces else 0.0), ces
