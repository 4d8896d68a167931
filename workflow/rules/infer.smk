# Cluster-parallel inference: the cases of a manifest are split into batches, each a job that loads the model once.


rule infer:
    input:
        manifest="results/manifests/{dataset}.tsv",
        checkpoint="results/model/final.pt",
    output:
        directory("results/predictions/{dataset}/batch_{batch}"),
    log:
        "logs/infer/{dataset}_batch_{batch}.log",
    params:
        tables=TABLE_ARGS,
        batches=lambda wildcards: len(batches_of(wildcards.dataset)),
        spacing=SPACING,
        roi=" ".join(str(v) for v in config["infer"]["roi"]),
        window=" ".join(str(v) for v in config["train"].get("window_hu", [-175, 250])),
        overlap=config["infer"]["overlap"],
        sw_batch_size=config["infer"]["sw_batch_size"],
        threshold=config["infer"]["threshold"],
        nifti="--nifti" if config["infer"]["export_nifti"] else "",
        device=config["device"],
    conda:
        "../envs/universal.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=12 * 60,
        gpu=GPU,
    shell:
        "universal infer {params.tables} --manifest {input.manifest} --checkpoint {input.checkpoint} "
        "--batch {wildcards.batch} --batches {params.batches} --spacing {params.spacing} --roi {params.roi} "
        "--window {params.window} --overlap {params.overlap} --sw-batch-size {params.sw_batch_size} "
        "--threshold {params.threshold} --device {params.device} {params.nifti} --out {output} > {log} 2>&1"
