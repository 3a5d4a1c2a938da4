"""Fine-tuning variants: each builds and learns; scratch U-Net and gene-encoder ablations train end
to end; a variant that fails to train is recorded as failed (or re-raised, if so configured)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from monai.losses import DiceCELoss

import mgi.train.finetune as finetune_module
from mgi.checkpoint import load_pretrained as read_pretrained
from mgi.checkpoint import save_pretrained
from mgi.cli import main
from mgi.errors import ConfigError, TrainingError
from mgi.models import SegmentationModel, UNetSegmentation
from mgi.options import FinetuneSettings, PretrainSettings, build, stage_settings
from mgi.train.finetune import build_variant, finetune
from mgi.train.pretrain import pretrain
from mgi.variants import VARIANTS

from .conftest import REPO, TinyCohort, write_tiny_cohort

VOCAB = 15  # write_tiny_cohort: 12 genes + 3 special tokens


def tuned(cohort: TinyCohort, **finetune_opts: object) -> dict:
    """The cohort's settings with small, fast fine-tuning options (and `finetune_opts`)."""
    settings = copy.deepcopy(cohort.settings)
    settings["finetune"].update(epochs=2, batch_size=16, decoder_channels=4, device="cpu",
                                unet={"channels": [4, 8, 16], "strides": [2, 2],
                                      "num_res_units": 1})
    settings["finetune"].update(finetune_opts)
    return settings


def run_finetune(cohort: TinyCohort, variant: str, out_dir: Path, settings: dict,
                 pretrained: Path | None = None) -> bool:
    return finetune(variant=variant, sequences_path=cohort.sequences, splits_path=cohort.splits,
                    qc_path=cohort.qc, pretrained_path=pretrained,
                    settings=stage_settings(FinetuneSettings, settings), out_dir=out_dir)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> TinyCohort:
    """The tiny cohort with a ViT deep enough for the segmentation decoder (patch 4: 2 maps)."""
    tiny = write_tiny_cohort(tmp_path_factory.mktemp("finetune") / "cohort")
    tiny.settings["model"]["image_encoder"]["depth"] = 2
    return tiny


def test_variant_registry_is_the_schema_enum():
    schema = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]
    enum = props["finetune"]["properties"]["variants"]["items"]["enum"]
    assert set(enum) == set(VARIANTS)
    kinds = props["model"]["properties"]["gene_encoder"]["properties"]["kind"]["enum"]
    ablations = {name for name, spec in VARIANTS.items() if spec.gene_encoder}
    assert ablations == {f"mgi_{kind}" for kind in kinds}
    for kind in kinds:
        spec = VARIANTS[f"mgi_{kind}"]
        assert spec.pretrained and spec.genes and spec.network == VARIANTS["mgi"].network


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_each_variant_builds_and_a_few_steps_lower_its_loss(cohort: TinyCohort, variant: str):
    settings = tuned(cohort)
    spec = VARIANTS[variant]
    torch.manual_seed(0)
    model = build_variant(variant, stage_settings(FinetuneSettings, settings), vocab_size=VOCAB,
                          seq_len=8, in_chans=1)
    if spec.network == "unet":
        assert isinstance(model, UNetSegmentation)
    else:
        assert isinstance(model, SegmentationModel)
        assert (model.gene_encoder is not None) == spec.genes
        if spec.genes:
            configured = settings["model"]["gene_encoder"]["kind"]
            assert model.gene_encoder.cfg.kind == spec.gene_kind(configured)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 1, 16, 16, generator=g)
    masks = torch.zeros(4, 1, 16, 16)
    masks[:, :, 4:12, 4:12] = 1.0
    images = images + 2.0 * masks
    genes = (torch.randint(3, VOCAB, (4, 8), generator=g),
             torch.randint(1, 11, (4, 8), generator=g).float()) if spec.genes else ()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(sigmoid=True)
    losses = []
    for _ in range(4):
        loss = loss_fn(model(images, *genes), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


@pytest.fixture(scope="module")
def transformer_pretraining(cohort: TinyCohort, tmp_path_factory) -> Path:
    """Contrastive pre-training of the tiny cohort with the transformer gene encoder."""
    settings = copy.deepcopy(cohort.settings)
    settings["model"]["gene_encoder"]["kind"] = "transformer"
    settings["pretrain"].update(epochs=1, checkpoint_every=0)
    out = tmp_path_factory.mktemp("pretrain_transformer")
    pretrain(sequences_path=cohort.sequences, splits_path=cohort.splits, qc_path=cohort.qc,
             settings=stage_settings(PretrainSettings, settings), out_dir=out)
    return out / "model.pt"


@pytest.mark.parametrize("variant", ["unet_scratch", "mgi_transformer"])
def test_scratch_unet_and_gene_encoder_ablation_train_end_to_end(
        cohort: TinyCohort, transformer_pretraining: Path, tmp_path: Path, variant: str):
    pretrained = transformer_pretraining if VARIANTS[variant].pretrained else None
    assert run_finetune(cohort, variant, tmp_path, tuned(cohort), pretrained)
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=False)
    assert checkpoint["variant"] == variant and "failed" not in checkpoint
    assert checkpoint["best_epoch"] in (1, 2) and 0.0 <= checkpoint["val_dice"] <= 1.0
    history = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert list(history["epoch"]) == [1, 2]
    model = build_variant(variant, build(FinetuneSettings, checkpoint["settings"]),
                          vocab_size=checkpoint["vocab_size"], seq_len=8,
                          in_chans=checkpoint["in_chans"])
    model.load_state_dict(checkpoint["state_dict"])  # evaluate rebuilds it the same way
    if variant == "mgi_transformer":
        assert model.gene_encoder.cfg.kind == "transformer"


def test_an_ablation_refuses_a_pretraining_of_another_gene_encoder(cohort: TinyCohort,
                                                                   tmp_path: Path):
    save_pretrained(tmp_path / "mamba.pt", state_dict={}, gene_config={"kind": "mamba"},
                    image_config={}, best_epoch=1)
    settings = tuned(cohort, on_failure="raise")
    with pytest.raises(TrainingError, match=r"'mamba'.*mgi_transformer uses 'transformer'"):
        run_finetune(cohort, "mgi_transformer", tmp_path / "out", settings, tmp_path / "mamba.pt")


def test_the_pretraining_records_its_image_channels(cohort: TinyCohort,
                                                    transformer_pretraining: Path):
    channels = read_pretrained(transformer_pretraining).channels
    assert channels == tuple(cohort.settings["imaging"]["mri"]["sequences"])


def test_a_pretraining_of_other_model_keys_or_channels_is_refused_naming_both(
        cohort: TinyCohort, transformer_pretraining: Path, tmp_path: Path):
    """Another cohort's pre-training: vocabulary, sizes and channels must be the fine-tuning's."""
    trained = read_pretrained(transformer_pretraining)
    settings = tuned(cohort, on_failure="raise")
    kinds = {"gene": dict(trained.gene_config, vocab_size=VOCAB + 7),
             "image": dict(trained.image_config, embed_dim=48, in_chans=4)}
    save_pretrained(tmp_path / "other.pt", state_dict=trained.state_dict,
                    gene_config=kinds["gene"], image_config=kinds["image"], best_epoch=1,
                    channels=("T2", "FLAIR", "T1 post"))
    with pytest.raises(ConfigError) as err:
        run_finetune(cohort, "mgi_transformer", tmp_path / "out", settings, tmp_path / "other.pt")
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'other.pt'}: the pre-training does not fit")
    assert f"gene encoder vocab_size: pre-trained {VOCAB + 7}, fine-tuning builds {VOCAB}" in (
        message)
    assert "image encoder embed_dim: pre-trained 48, fine-tuning builds" in message
    assert "image encoder in_chans: pre-trained 4, fine-tuning builds 1" in message
    assert "image channels: pre-trained on ['T2', 'FLAIR', 'T1 post']" in message
    # an image-only variant does not read the gene encoder: only the image side is checked
    with pytest.raises(ConfigError) as err:
        run_finetune(cohort, "mgi_image_only", tmp_path / "image", settings, tmp_path / "other.pt")
    assert "gene encoder" not in str(err.value) and "embed_dim" in str(err.value)


def nan_from_call(monkeypatch, call: int) -> None:
    """Make the training batches NaN from the `call`-th batch on (the loss check then fails)."""
    calls = {"n": 0}
    original = finetune_module.augment

    def augment(*args, **kwargs):
        calls["n"] += 1
        images, masks = original(*args, **kwargs)
        return (images * float("nan") if calls["n"] >= call else images), masks

    monkeypatch.setattr(finetune_module, "augment", augment)


def test_a_variant_that_fails_to_train_is_recorded_as_failed_and_the_job_succeeds(
        cohort: TinyCohort, tmp_path: Path, monkeypatch, caplog):
    nan_from_call(monkeypatch, call=3)  # 24 training slices, 2 batches per epoch: fails in epoch 2
    settings = tuned(cohort)
    assert settings["finetune"]["on_failure"] == "record"  # the schema's default
    code = main(["finetune", "--variant", "vit_scratch", "--sequences", str(cohort.sequences),
                 "--splits", str(cohort.splits), "--qc", str(cohort.qc),
                 "--settings", json.dumps(settings), "--out-dir", str(tmp_path)])
    assert code == 0
    checkpoint = torch.load(tmp_path / "model.pt", weights_only=False)
    assert checkpoint["variant"] == "vit_scratch" and checkpoint["failed"] is True
    assert "loss is not finite at epoch 2" in checkpoint["error"]
    assert "\n" not in checkpoint["error"] and "state_dict" not in checkpoint
    history = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert list(history["epoch"]) == [1]  # the curves so far
    assert "Traceback" in caplog.text and "recorded as failed" in caplog.text


def test_a_failure_before_the_first_epoch_leaves_an_empty_history(cohort: TinyCohort,
                                                                  tmp_path: Path, monkeypatch):
    nan_from_call(monkeypatch, call=1)
    assert not run_finetune(cohort, "unet_scratch", tmp_path, tuned(cohort))
    history = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert history.empty and {"epoch", "train_loss", "val_dice"} <= set(history.columns)
    assert torch.load(tmp_path / "model.pt", weights_only=False)["failed"] is True


def test_on_failure_raise_reraises_and_writes_no_model(cohort: TinyCohort, tmp_path: Path,
                                                       monkeypatch):
    nan_from_call(monkeypatch, call=1)
    with pytest.raises(TrainingError, match="not finite"):
        run_finetune(cohort, "vit_scratch", tmp_path, tuned(cohort, on_failure="raise"))
    assert not (tmp_path / "model.pt").exists()


def test_a_missing_pretraining_is_a_recorded_failure_too(cohort: TinyCohort, tmp_path: Path):
    """Anything after the data is loaded counts, here a pre-trained variant without --pretrained."""
    assert not run_finetune(cohort, "mgi", tmp_path, tuned(cohort))
    error = torch.load(tmp_path / "model.pt", weights_only=False)["error"]
    assert error == "variant mgi needs the pre-trained model (--pretrained)"
