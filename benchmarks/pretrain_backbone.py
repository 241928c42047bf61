"""Pre-train a small backbone here, on data disjoint from a continual stream, and save it as a weights file that
loads through exactly the path a user's real weights take (``--model ... --weights FILE``).

    python benchmarks/pretrain_backbone.py --backbone vit --out weights/vit_fmnist.safetensors
    python benchmarks/pretrain_backbone.py --backbone resnet --out weights/resnet_fmnist.safetensors

Fashion-MNIST's 60,000 training images (all ten classes), then ``retain run --benchmark split-mnist ...`` learns the
MNIST digits continually from it (docs/pretrained.md). The ViT is timm's ``vit_tiny_patch16_224`` shape cut to 4
blocks, with 7-pixel patches over 28 x 28 grey images (16 patches); the ResNet is retain's ``resnet18-reduced``.
Supervised cross-entropy with AdamW and a one-cycle schedule, random 2-pixel shifts; pixels normalised with mean 0.5,
std 0.5 (kept in the file's metadata, so the continual run normalises the same way). Prints the test accuracy per
epoch and writes the file after each epoch.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from retain import benchmarks
from retain.backbones import save_weights
from retain.models import build_model
from retain.vit import ViT

VIT = "timm:vit_tiny_patch16_224,img_size=28,patch_size=7,in_chans=1,depth=4"
MEAN, STD = (0.5,), (0.5,)


def shift(x: torch.Tensor, g: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Each image ``[N, C, H, W]`` moved by up to ``pad`` pixels in each direction (zero fill)."""
    n, c, h, w = x.shape
    big = F.pad(x, (pad, pad, pad, pad))
    dy, dx = (torch.randint(0, 2 * pad + 1, (n,), generator=g) for _ in range(2))
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w)
    return big[torch.arange(n).view(n, 1, 1, 1), torch.arange(c).view(1, c, 1, 1), rows, cols]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", choices=("vit", "resnet"), default="vit")
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    sc = benchmarks.scenario("split-fashion-mnist", "class", 5, 0, a.data_dir)
    norm = lambda x: (x.float() / 255 - MEAN[0]) / STD[0]  # noqa: E731
    if a.backbone == "vit":
        from retain.backbones import parse_spec, vit_config

        body: nn.Module = ViT(vit_config(parse_spec(VIT)))
        dim, name = body.embed_dim, VIT
    else:
        net = build_model("resnet18-reduced", (1, 28, 28), 10)
        body, dim, name = net.features, net.head.in_features, "resnet18-reduced"
    head = nn.Linear(dim, 10)
    model = nn.Sequential(body, nn.Flatten(), head)
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.05)
    steps = a.epochs * math.ceil(len(sc.y_train) / a.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, a.lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(a.seed)
    for epoch in range(a.epochs):
        start = time.perf_counter()
        model.train()
        perm = torch.randperm(len(sc.y_train), generator=g)
        total = 0.0
        for i in range(0, len(perm), a.batch_size):
            idx = perm[i:i + a.batch_size]
            x = shift(norm(sc.x_train[idx]), g)
            loss = F.cross_entropy(model(x), sc.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            correct = sum(int((model(norm(sc.x_test[i:i + 1000])).argmax(1) == sc.y_test[i:i + 1000]).sum())
                          for i in range(0, len(sc.y_test), 1000))
        print(f"epoch {epoch + 1}: loss {total / len(perm):.4f}, Fashion-MNIST test accuracy "
              f"{100 * correct / len(sc.y_test):.2f}%, {time.perf_counter() - start:.0f} s", flush=True)
        path = save_weights(body, a.out, name, MEAN, STD, epochs=epoch + 1, test_accuracy=correct / len(sc.y_test),
                            pretrained_on="fashion-mnist train (60,000 images, 10 classes)")
        print(f"saved {path} (after epoch {epoch + 1})", flush=True)


if __name__ == "__main__":
    main()
