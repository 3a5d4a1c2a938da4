"""Contrastive pre-training of the Mamba gene encoder and the ViT image encoder."""


rule pretrain:
    """CLIP-style alignment of gene sequences and images; curves and retrieval on held-out patients."""
    input:
        sequences=results("expression/sequences.npz"),
        splits=results("splits.tsv"),
        qc=results("images/qc.tsv"),
    output:
        model=results("pretrain/model.pt"),
        history=results("pretrain/history.tsv"),
        retrieval=results("pretrain/retrieval.json"),
    log:
        logs("pretrain.log"),
    # first among ready jobs: the fine-tunings that start from it, and the report, wait on it
    priority: 10
    conda:
        ENV
    threads: PRETRAIN_THREADS
    resources:
        mem_mb=8000,
        gpu=1,
        # processes per node (one per GPU) and nodes; a profile may raise them (slurm does)
        tasks_per_node=lookup(dpath="pretrain/devices", within=config),
        nodes=lookup(dpath="pretrain/num_nodes", within=config),
    params:
        settings=settings(*PRETRAIN_SECTIONS),
        out_dir=folder_of("model"),
    shell:
        "mgi pretrain --sequences {input.sequences} --splits {input.splits} --qc {input.qc} "
        "--settings {params.settings:q} --out-dir {params.out_dir} "
        "--devices {resources.tasks_per_node} --num-nodes {resources.nodes} "
        "--threads {threads} > {log} 2>&1"


rule pretrain_ablation:
    """The same pre-training with another gene encoder, for the gene-encoder ablation variants."""
    input:
        sequences=results("expression/sequences.npz"),
        splits=results("splits.tsv"),
        qc=results("images/qc.tsv"),
    output:
        model=results("pretrain/ablation/{kind}/model.pt"),
        history=results("pretrain/ablation/{kind}/history.tsv"),
        retrieval=results("pretrain/ablation/{kind}/retrieval.json"),
    log:
        logs("pretrain_ablation/{kind}.log"),
    wildcard_constraints:
        kind="|".join(GENE_ENCODER_KINDS),
    priority: 10
    conda:
        ENV
    threads: PRETRAIN_THREADS
    resources:
        mem_mb=8000,
        gpu=1,
        tasks_per_node=lookup(dpath="pretrain/devices", within=config),
        nodes=lookup(dpath="pretrain/num_nodes", within=config),
    params:
        settings=ablation_settings,
        out_dir=folder_of("model"),
    shell:
        "mgi pretrain --sequences {input.sequences} --splits {input.splits} --qc {input.qc} "
        "--settings {params.settings:q} --out-dir {params.out_dir} "
        "--devices {resources.tasks_per_node} --num-nodes {resources.nodes} "
        "--threads {threads} > {log} 2>&1"


if BUNDLED:

    rule unbundle_pretrained:
        """The pre-training checkpoint and sequence encoding of the bundle finetune.pretrained."""
        input:
            bundle=PRETRAINED,
        output:
            model=results("pretrained/model.pt"),
            encoding=results("pretrained/encoding.npz"),
        log:
            logs("unbundle_pretrained.log"),
        conda:
            ENV
        threads: 1
        resources:
            mem_mb=2000,
        shell:
            "mgi unbundle --bundle {input.bundle:q} --pretrain {output.model} "
            "--encoding {output.encoding} > {log} 2>&1"
