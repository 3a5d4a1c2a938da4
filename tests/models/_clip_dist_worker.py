"""Worker for test_clip's two-rank ClipLoss test; imports only torch and mgi.models.clip."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mgi.models.clip import ClipLoss


def paired_features(n: int = 8, dim: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random unit image and gene features on every rank."""
    g = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(n, dim, generator=g), dim=-1), F.normalize(
        torch.randn(n, dim, generator=g), dim=-1
    )


def run(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    """Loss and feature gradients of this rank's half of the batch, saved to out_dir/rank{r}.pt."""
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        images, genes = paired_features()
        rows = images.shape[0] // world_size
        local = slice(rows * rank, rows * (rank + 1))
        image_part = images[local].clone().requires_grad_()
        gene_part = genes[local].clone().requires_grad_()
        loss = ClipLoss()(image_part, gene_part, torch.tensor(3.0))
        loss.backward()
        torch.save(
            {"loss": loss.item(), "image_grad": image_part.grad, "gene_grad": gene_part.grad},
            f"{out_dir}/rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()
