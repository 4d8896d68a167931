# Evaluation: Dice per case and class for every labelled external dataset, aggregated by dask into a report.


rule evaluate:
    input:
        manifest="results/manifests/{dataset}.tsv",
        predictions="results/predictions/{dataset}/batch_{batch}",
    output:
        directory("results/metrics/{dataset}/batch_{batch}"),
    log:
        "logs/evaluate/{dataset}_batch_{batch}.log",
    params:
        tables=CATALOG_ARGS,
        batches=lambda wildcards: len(batches_of(wildcards.dataset)),
    conda:
        "../envs/universal.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "universal evaluate {params.tables} --dataset {wildcards.dataset} --manifest {input.manifest} "
        "--predictions {input.predictions} --batch {wildcards.batch} --batches {params.batches} --out {output} > {log} 2>&1"


rule aggregate:
    input:
        metric_dirs(),
    output:
        per_case="results/evaluation/per_case.tsv",
        per_class=report(
            "results/evaluation/per_class.tsv",
            caption="../report/per_class.rst",
            category="Evaluation",
        ),
        per_dataset=report(
            "results/evaluation/per_dataset_class.tsv",
            caption="../report/per_dataset_class.rst",
            category="Evaluation",
        ),
        plot=report(
            "results/evaluation/dice_per_class.png",
            caption="../report/dice_per_class.rst",
            category="Evaluation",
        ),
    log:
        "logs/aggregate.log",
    params:
        tables=TABLE_ARGS,
        out=lambda wildcards, output: Path(output.per_class).parent,
    conda:
        "../envs/universal.yaml"
    threads: config["aggregate"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "universal aggregate {params.tables} --metrics {input} --out {params.out} --threads {threads} > {log} 2>&1"
