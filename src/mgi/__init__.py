"""mgi: Multimodal contrastive pre-training of Genomic and medical Imaging (MGI), as a workflow."""

__version__ = "0.1.0"
