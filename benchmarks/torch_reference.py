"""The LarvSeg train step in PyTorch, for the side-by-side benchmark only (never imported by the
library or the tests): timm's ViT-B/16 (fused attention) with the paper's cosine head and mask
norm (SPEC 1.3), the seg CE (2.2), the image-level CE (2.3) and the CA-classifier with its memory
bank, written as the official code runs it, pair by pair (2.4), and SGD with momentum.

One step = one segmentation group and one weak group of 2 images each (the official code's GPUs
r and r+1), a backward pass per group (DDP's mean of the two losses) and one update.
"""

import torch
import torch.nn.functional as F


def l2norm(x, dim=-1):
    return x / x.norm(dim=dim, keepdim=True).clamp_min(1e-12)


class CosineHead(torch.nn.Module):
    """proj_patch P, proj_classes Q, cls_emb E, gamma, beta (SPEC 1.3)."""

    def __init__(self, num_classes, dim=768):
        super().__init__()
        self.proj_patch = torch.nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.proj_classes = torch.nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.cls_emb = torch.nn.Parameter(torch.randn(num_classes, dim) * 0.02)
        self.gamma = torch.nn.Parameter(torch.ones(()))
        self.beta = torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens, cls_index, hw):
        """tokens (B, h*w, D) -> logits (B, N, h, w), score (B, N, h*w), embed (B, h*w, D)."""
        xp = l2norm(tokens @ self.proj_patch)
        ec = l2norm(self.cls_emb[cls_index] @ self.proj_classes)
        s = xp @ ec.t()  # (B, h*w, N)
        mean = s.mean(-1, keepdim=True)
        var = s.var(-1, unbiased=False, keepdim=True)
        z = self.gamma * (s - mean) / torch.sqrt(var + 1e-5) + self.beta
        b, _, n = z.shape
        logits = z.transpose(1, 2).reshape(b, n, *hw)
        return logits, s.detach().transpose(1, 2), xp.detach()


class Block(torch.nn.Module):
    """timm's ViT block: pre-LN, fused attention (scaled_dot_product_attention), GELU MLP,
    drop path; used when timm cannot be imported (it needs torchvision)."""

    def __init__(self, width, num_heads, mlp_dim, drop_path):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(width, eps=1e-6)
        self.norm2 = torch.nn.LayerNorm(width, eps=1e-6)
        self.qkv, self.proj = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)
        self.fc1, self.fc2 = torch.nn.Linear(width, mlp_dim), torch.nn.Linear(mlp_dim, width)
        self.num_heads, self.drop_path = num_heads, drop_path

    def _drop(self, x):
        if not self.training or self.drop_path == 0:
            return x
        keep = torch.rand(x.shape[0], 1, 1) >= self.drop_path
        return x * keep / (1 - self.drop_path)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self._drop(self.proj(y))
        return x + self._drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class PlainViT(torch.nn.Module):
    """timm's VisionTransformer forward_features, written out (class token, learned positions)."""

    def __init__(self, crop, width, depth, num_heads, mlp_dim, patch_size, drop_path):
        super().__init__()
        n = (crop // patch_size) ** 2
        self.patch_embed = torch.nn.Conv2d(3, width, patch_size, stride=patch_size)
        self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = torch.nn.Parameter(torch.randn(1, n + 1, width) * 0.02)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.blocks = torch.nn.Sequential(*(Block(width, num_heads, mlp_dim, r) for r in rates))
        self.norm = torch.nn.LayerNorm(width, eps=1e-6)

    def forward_features(self, images):
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        return self.norm(self.blocks(x))


def make_backbone(crop, width, depth, num_heads, mlp_dim, patch_size, drop_path):
    """(timm's VisionTransformer, "timm"), or without timm (same network) "timm-equivalent"."""
    try:
        from timm.models.vision_transformer import VisionTransformer
    except (ImportError, RuntimeError):
        net = PlainViT(crop, width, depth, num_heads, mlp_dim, patch_size, drop_path)
        return net, "timm-equivalent"
    net = VisionTransformer(
        img_size=crop,
        patch_size=patch_size,
        embed_dim=width,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_dim / width,
        num_classes=0,
        global_pool="",
        drop_path_rate=drop_path,
    )
    return net, "timm"


class Segmenter(torch.nn.Module):
    """A ViT of the given sizes (ViT-B/16: width 768, depth 12, 12 heads) + the cosine head."""

    def __init__(
        self, num_classes, crop, width, depth, num_heads, mlp_dim, patch_size, drop_path=0.1
    ):
        super().__init__()
        self.backbone, self.backbone_kind = make_backbone(
            crop, width, depth, num_heads, mlp_dim, patch_size, drop_path
        )
        self.head = CosineHead(num_classes, width)
        self.grid = (crop // patch_size, crop // patch_size)

    def forward(self, images, cls_index):
        tokens = self.backbone.forward_features(images)[:, 1:]  # drop the class token
        return self.head(tokens, cls_index, self.grid)


def seg_loss(logits, labels):
    """SPEC 2.2: mean over all H*W pixels at half resolution, ignored pixels count as 0."""
    h, w = labels.shape[-2] // 2, labels.shape[-1] // 2
    up = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
    lab = labels[:, ::2, ::2]
    per_pixel = F.cross_entropy(up, lab.clamp_min(0), reduction="none")
    return (per_pixel * (lab >= 0)).mean()


class Bank:
    """SPEC 2.4 state: queue (C, M, K, D), ptr, full; per device, never synchronised."""

    def __init__(self, num_classes, memory, topk, dim):
        self.queue = l2norm(torch.randn(num_classes, memory, topk, dim))
        self.ptr = torch.zeros(num_classes, dtype=torch.long)
        self.full = torch.zeros(num_classes, dtype=torch.long)
        self.memory, self.topk = memory, topk

    def score(self, feats, row):
        """Mean cosine of pixel features (P, D) to the M*K vectors of class `row`."""
        bank = l2norm(self.queue[row].reshape(-1, feats.shape[-1]))
        return (feats @ bank.t()).mean(-1)

    def enqueue(self, row, feats):
        self.queue[row, self.ptr[row]] = feats
        if self.ptr[row] == self.memory - 1:
            self.full[row] += 1
        self.ptr[row] = (self.ptr[row] + 1) % self.memory


def weak_losses(logits, score, embed, labels, cls_index, bank, warm_up=0, bg_topk=5, bg_thresh=0.2):
    """SPEC 2.3 image-level CE and 2.4 CA aux loss, pair by pair in the official order."""
    b, n, h, w = logits.shape
    hh, ww = labels.shape[-2] // 2, labels.shape[-1] // 2
    up = F.interpolate(logits, size=(hh, ww), mode="bilinear", align_corners=False)
    lab = labels[:, ::2, ::2]
    basic, aux, pairs = [], [], 0
    for i in range(b):
        present = [int(c) for c in torch.unique(lab[i]) if c >= 0]
        feats = l2norm(embed[i])  # (h*w, D)
        for label in present:
            keep = [c for c in range(n) if c == label or c not in present]
            target = torch.tensor(keep.index(label))
            zbar = up[i, keep].mean((1, 2))
            basic.append(F.cross_entropy(zbar[None], target[None]))
            pairs += 1
            row = int(cls_index[label])
            if bank.full[row] >= warm_up:
                s_fg = bank.score(feats, row)
                if len(present) > 1:
                    bg = [c for c in present if c != label]
                else:
                    top = score[i].topk(bg_topk, dim=-1).values.mean(-1)
                    bg = [c for c in range(n) if top[c] > bg_thresh and c != label]
                if bg:
                    s_bg = torch.stack([bank.score(feats, int(cls_index[c])) for c in bg]).mean(0)
                else:
                    s_bg = 1 - s_fg
                d = s_fg - s_bg
                a = (d - d.mean()) / torch.sqrt(d.var(unbiased=False) + 1e-5)
                att = F.interpolate(
                    a.reshape(1, 1, h, w), size=(hh, ww), mode="bilinear", align_corners=False
                )
                att = torch.sigmoid(att)[0, 0]
                zt = (up[i, keep] * att).mean((1, 2))
                aux.append(F.cross_entropy(zt[None], target[None]))
            else:
                aux.append(up.sum() * 0)
            idx = score[i, label].topk(bank.topk).indices
            bank.enqueue(row, embed[i, idx])
    basic_loss = torch.stack(basic).sum() / max(pairs, 1)
    aux_loss = torch.stack(aux).sum() / max(pairs, 1)
    return basic_loss, aux_loss


class Step:
    """One LarvSeg train step: a seg group and a weak group (lambda_cls = lambda_aux = 0.1)."""

    def __init__(
        self, num_classes, crop, memory, topk, seg_index, weak_index, sizes, lr=1e-3, bf16=False
    ):
        self.model = Segmenter(num_classes, crop, **sizes)
        self.bf16 = bf16
        self.bank = Bank(num_classes, memory, topk, sizes["width"])
        self.seg_index = torch.as_tensor(seg_index)
        self.weak_index = torch.as_tensor(weak_index)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9)

    def __call__(self, seg_images, seg_labels, weak_images, weak_labels):
        """Each group's backward runs on its own (the official GPUs' memory); the gradients
        add up to those of the mean of the two group losses, as DDP's average does."""
        self.opt.zero_grad(set_to_none=True)
        logits, _, _ = self.forward(seg_images, self.seg_index)
        loss_seg = seg_loss(logits, seg_labels) / 2
        loss_seg.backward()
        logits, score, embed = self.forward(weak_images, self.weak_index)
        basic, aux = weak_losses(logits, score, embed, weak_labels, self.weak_index, self.bank)
        loss_weak = (0.1 * basic + 0.1 * aux) / 2
        loss_weak.backward()
        self.opt.step()
        return float((loss_seg + loss_weak).detach())

    def forward(self, images, cls_index):
        """The network; with bf16, under CPU autocast (bf16 matmuls, fp32 weights) with fp32
        outputs, so losses and bank stay fp32 as in the JAX step's bfloat16 model dtype."""
        if not self.bf16:
            return self.model(images, cls_index)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs = self.model(images, cls_index)
        return tuple(o.float() for o in outs)
