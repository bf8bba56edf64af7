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


def zscore(x, ddof):
    return (x - x.mean()) / np.sqrt(x.var(ddof=ddof) + (1e-5 if ddof == 0 else 0.0))


def ca_reference(queue, ptr, full, embed, score, labels, logits_up, cls_index, cfg):
    """Loop-based SPEC 2.4 for one device: returns (aux loss, queue, ptr, full, per-pair dicts).

    embed [B, P, D], score [B, P, N], labels [B, H, W] loss-grid labels, logits_up [B, H, W, N],
    feature grid h = w = sqrt(P). Bank arrays are modified in copies.
    """
    queue, ptr, full = queue.copy(), ptr.copy(), full.copy()
    b_count, p = embed.shape[:2]
    side = round(p**0.5)
    m = queue.shape[1]
    big_h, big_w = labels.shape[1:]
    terms, pairs = [], []
    for b in range(b_count):
        present = sorted(set(labels[b].ravel().tolist()) - {-1})
        for l in present:
            u = cls_index[l]
            f = l2n(embed[b])
            info = {"b": b, "l": l, "warm": full[u] >= cfg["warm_up"]}
            if cfg.get("single_image"):
                idx = np.argsort(-score[b][:, l], kind="stable")[: cfg["topk"]]
                queue[u, ptr[u]] = embed[b][idx]
                full[u] += ptr[u] == m - 1
                ptr[u] = (ptr[u] + 1) % m
            if info["warm"] or cfg.get("single_image"):

                def bank_score(c, f=f):
                    return (f @ l2n(queue[cls_index[c]].reshape(-1, f.shape[1])).T).mean(1)

                s_fg = bank_score(l)
                if len(present) > 1:
                    bg = [c for c in present if c != l]
                else:
                    top = np.sort(score[b], axis=0)[::-1][: cfg["bg_topk"]].mean(0)
                    cand = [
                        c for c in range(score.shape[2]) if top[c] > cfg["bg_thresh"] and c != l
                    ]
                    bg = []
                    for c in cand:
                        with np.errstate(invalid="ignore", divide="ignore"):
                            mse = np.mean((zscore(s_fg, 1) - zscore(bank_score(c), 1)) ** 2)
                        if mse > cfg["bg_mse_thresh"]:
                            bg.append(c)
                s_bg = np.mean([bank_score(c) for c in bg], axis=0) if bg else 1 - s_fg
                a = zscore(s_fg - s_bg, 0)
                up = upsample(a.reshape(1, side, side, 1), (big_h, big_w))[0, :, :, 0]
                att = 1 / (1 + np.exp(-up))
                zt = (att[..., None] * logits_up[b]).mean(axis=(0, 1))
                keep = [c for c in range(zt.shape[0]) if c == l or c not in present]
                term = -log_softmax(zt[keep])[keep.index(l)]
                info.update(s_fg=s_fg, s_bg=s_bg, a=a, bg=bg)
            else:
                term = 0.0
            terms.append(term)
            info["term"] = term
            pairs.append(info)
            if not cfg.get("single_image"):
                idx = np.argsort(-score[b][:, l], kind="stable")[: cfg["topk"]]
                queue[u, ptr[u]] = embed[b][idx]
                full[u] += ptr[u] == m - 1
                ptr[u] = (ptr[u] + 1) % m
    loss = sum(terms) / len(terms) if terms else 0.0
    return loss, queue, ptr, full, pairs


def oracle_labels(embed, gt, seeds, num_classes, out_hw, absent_never_win=False):
    """SPEC 9 steps 1-7 on one image.

    embed [h, w, D] unit features at the feature grid; gt [H, W] ground truth at the input size;
    seeds {class id: [flat pixel indices]}; returns int [H0, W0] = out_hw labels.
    """
    h_in, w_in = gt.shape
    up = l2n(upsample(embed[None].astype(np.float64), (h_in, w_in))[0])  # steps 1-2
    flat = up.reshape(h_in * w_in, -1)
    classes = sorted(seeds)
    response = np.zeros((num_classes, h_in, w_in))  # step 6: absent classes stay all zero
    for c in classes:
        response[c] = (flat @ flat[seeds[c]].T).max(axis=1).reshape(h_in, w_in)  # step 5
    if absent_never_win:  # the fix: only present classes compete
        response = response[classes]
    big = upsample(response.transpose(1, 2, 0)[None], out_hw)[0]  # step 7: original size
    probs = np.exp(log_softmax(big))
    winner = np.argmax(probs, axis=-1)
    return np.asarray(classes)[winner] if absent_never_win else winner
