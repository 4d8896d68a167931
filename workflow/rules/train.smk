# Train the universal model on the zarr stores of the training datasets: one process on the CPU or one GPU, torchrun
# with one process per GPU (DDP) when the config gives the job several (train.gpus with device cuda).


localrules:
    train_settings,


rule train_settings:
    output:
        "results/model/train_settings.yaml",
    log:
        "logs/train_settings.log",
    params:
        settings=TRAIN_SETTINGS,
    conda:
        "../envs/universal.yaml"
    script:
        "../scripts/write_settings.py"


rule train:
    input:
        stores=expand("results/store/{dataset}.zarr", dataset=TRAIN_DATASETS),
        embeddings="results/embeddings/prompts.pt",
        settings="results/model/train_settings.yaml",
        val_stores=expand("results/store/{dataset}.zarr", dataset=VALIDATION_DATASETS),
    output:
        checkpoint="results/model/final.pt",
        log_csv="results/model/train_log.csv",
        manifest="results/model/training_manifest.tsv",
    log:
        "logs/train.log",
    params:
        tables=TABLE_ARGS,
        weights=" ".join(str(DATASETS[d].get("weight", 1.0)) for d in TRAIN_DATASETS),
        out_dir=lambda wildcards, output: Path(output.checkpoint).parent,
        command=train_command(),
    conda:
        "../envs/universal.yaml"
    threads: 2 * max(1, TRAIN_GPUS)
    resources:
        mem_mb=16000 * max(1, TRAIN_GPUS),
        runtime=24 * 60,
        gpu=TRAIN_GPUS,
    shell:
        "{params.command} {params.tables} --stores {input.stores:q} --weights {params.weights} "
        "--embeddings {input.embeddings:q} --settings {input.settings:q} --out-dir {params.out_dir:q} "
        "> {log:q} 2>&1"
