# Train the universal model on the zarr stores of the training datasets (torchrun/DDP inside the job on GPUs).
import json


rule train:
    input:
        stores=expand("results/store/{dataset}.zarr", dataset=TRAIN_DATASETS),
        embeddings="results/embeddings/prompts.pt",
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
        options=json.dumps({**config["train"], "device": config["device"], **validation_options()}),
        out_dir=lambda wildcards, output: Path(output.checkpoint).parent,
    conda:
        "../envs/universal.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=24 * 60,
        gpu=GPU,
    shell:
        "universal train {params.tables} --stores {input.stores} --weights {params.weights} "
        "--embeddings {input.embeddings} --out-dir {params.out_dir} --options '{params.options}' > {log} 2>&1"
