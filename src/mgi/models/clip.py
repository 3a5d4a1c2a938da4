"""Contrastive image-gene model (CLIP), its symmetric InfoNCE loss and retrieval metrics."""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from mgi.models.gene_encoder import GeneEncoderConfig
    from mgi.models.image_encoder import ImageEncoderConfig

log = logging.getLogger(__name__)


class ClipModel(nn.Module):
    """Image and gene encoders projecting into one space, with a learned temperature."""

    def __init__(
        self,
        gene: GeneEncoderConfig,
        image: ImageEncoderConfig,
        *,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        if gene.embed_dim != image.embed_dim:
            raise ValueError(
                f"GeneEncoderConfig.embed_dim ({gene.embed_dim}) must equal "
                f"ImageEncoderConfig.embed_dim ({image.embed_dim}) for a joint embedding"
            )
        if init_temperature <= 0 or max_logit_scale <= 0:
            raise ValueError("init_temperature and max_logit_scale must be positive")
        # imported here so that ClipLoss and retrieval_metrics do not pull in timm
        from mgi.models.gene_encoder import GeneEncoder
        from mgi.models.image_encoder import ImageEncoder

        self.gene_encoder = GeneEncoder(gene)
        self.image_encoder = ImageEncoder(image)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_logit_scale = float(max_logit_scale)

    def encode_image(self, images: Tensor) -> Tensor:
        """L2-normalised image embeddings (B, embed_dim)."""
        return F.normalize(self.image_encoder(images), dim=-1)

    def encode_genes(self, token_ids: Tensor, values: Tensor) -> Tensor:
        """L2-normalised gene embeddings (B, embed_dim)."""
        return F.normalize(self.gene_encoder(token_ids, values), dim=-1)

    def scale(self) -> Tensor:
        """The logit scale (1 / temperature), clamped to `max_logit_scale`."""
        return self.logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()

    def forward(
        self, images: Tensor, token_ids: Tensor, values: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(image features, gene features, logit scale): unit-norm features, exp(scale) <= max."""
        return self.encode_image(images), self.encode_genes(token_ids, values), self.scale()


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns each rank the summed gradient of its own slice.

    Written by hand because torch.distributed.nn.functional.all_gather (open_clip's choice) is
    deprecated in torch 2.14 and its suggested replacements are private API. The backward uses
    all_reduce + slice (not reduce_scatter) so it also runs on gloo; features are small.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def _gather_with_grad(features: Tensor) -> Tensor:
    """Features of every rank concatenated (rank order); gradients flow back to the local part."""
    return _AllGatherWithGrad.apply(features)


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over the batch (open_clip's ClipLoss, local loss with gathered negatives).

    Under torch.distributed every rank scores its own rows against the features of the whole
    global batch, so negatives come from all ranks; labels are offset by rank * local batch.
    `gather=False` keeps the loss local (for evaluation that each rank runs on its own).
    After a call, `n_candidates` is the number of pairs each row was scored against.
    """

    def __init__(self, *, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather
        self.n_candidates = 0

    def forward(self, image_features: Tensor, gene_features: Tensor, logit_scale: Tensor) -> Tensor:
        """Mean of image->gene and gene->image cross-entropy (a scalar)."""
        n = image_features.shape[0]
        labels = torch.arange(n, device=image_features.device)
        all_images, all_genes = image_features, gene_features
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self.gather and distributed:
            all_images = _gather_with_grad(image_features)
            all_genes = _gather_with_grad(gene_features)
            labels = labels + dist.get_rank() * n  # equal local batch sizes, as all_gather requires
        self.n_candidates = all_genes.shape[0]
        logits_per_image = logit_scale * image_features @ all_genes.T
        logits_per_gene = logit_scale * gene_features @ all_images.T
        return (
            F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_gene, labels)
        ) / 2


def _ranks(similarity: Tensor) -> Tensor:
    """0-based rank of each row's diagonal entry among that row (ties count in its favour)."""
    diagonal = similarity.diagonal().unsqueeze(1)
    return (similarity > diagonal).sum(dim=1)


@torch.no_grad()
def retrieval_metrics(
    image_features: Tensor, gene_features: Tensor, *, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    """Paired retrieval scores: recall@k and mean rank both ways, chance recall k/N, and N.

    Keys: gene_to_image_recall@k, image_to_gene_recall@k, chance_recall@k,
    gene_to_image_mean_rank, image_to_gene_mean_rank (1 = always first), n.
    Row i of each input is one pair; similarity is cosine.
    """
    if image_features.shape != gene_features.shape or image_features.dim() != 2:
        raise ValueError(
            f"image_features and gene_features must be the same (N, D) shape, got "
            f"{tuple(image_features.shape)} and {tuple(gene_features.shape)}"
        )
    n = image_features.shape[0]
    if n == 0:
        raise ValueError("retrieval_metrics needs at least one pair")
    image = F.normalize(image_features.float(), dim=-1)
    gene = F.normalize(gene_features.float(), dim=-1)
    similarity = gene @ image.T  # rows: genes, columns: images
    ranks = {"gene_to_image": _ranks(similarity), "image_to_gene": _ranks(similarity.T)}
    metrics: dict[str, float] = {}
    for direction, rank in ranks.items():
        for k in ks:
            metrics[f"{direction}_recall@{k}"] = float((rank < k).float().mean())
        metrics[f"{direction}_mean_rank"] = float((rank + 1).float().mean())
    for k in ks:
        metrics[f"chance_recall@{k}"] = min(1.0, k / n)
    metrics["n"] = n
    return metrics
