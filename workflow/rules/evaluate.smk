# Evaluation: Dice, NSD and HD95 per case and class for every labelled external dataset, and tumour detection,
# aggregated by dask into tables (TSV and Parquet), box plots and the report (on a LocalCluster of the aggregate
# job's threads and memory, or the scheduler or SLURMCluster the config names).


rule evaluate:
    input:
        manifest="results/manifests/{dataset}.tsv",
        batch_report="results/predictions/{dataset}/batch_{batch}.tsv",
    output:
        metrics=directory("results/metrics/{dataset}/batch_{batch}"),
        failures="results/metrics/{dataset}/batch_{batch}.failures.tsv",
    log:
        "logs/evaluate/{dataset}_batch_{batch}.log",
    params:
        tables=CATALOG_ARGS,
        predictions=lambda wildcards, input: Path(input.batch_report).parent,
        batches=config["infer"]["batches"],
    conda:
        "../envs/universal.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=120,
    shell:
        "universal evaluate {params.tables} --dataset {wildcards.dataset} --manifest {input.manifest:q} "
        "--predictions {params.predictions:q} --batch-report {input.batch_report:q} --batch {wildcards.batch} "
        "--batches {params.batches} --out {output.metrics:q} --failures {output.failures:q} > {log:q} 2>&1"


rule aggregate:
    input:
        metrics=metric_dirs(),
        failures=[f"{folder}.failures.tsv" for folder in metric_dirs()],
    output:
        per_case="results/evaluation/per_case.tsv",
        parquet=expand(
            "results/evaluation/{table}.parquet",
            table=["per_case", "per_class", "per_dataset_class", "detection", "detection_per_dataset"],
        ),
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
        detection=report(
            "results/evaluation/detection.tsv",
            caption="../report/detection.rst",
            category="Evaluation",
        ),
        detection_per_dataset=report(
            "results/evaluation/detection_per_dataset.tsv",
            caption="../report/detection_per_dataset.rst",
            category="Evaluation",
        ),
        plot=report(
            "results/evaluation/dice_per_class.png",
            caption="../report/dice_per_class.rst",
            category="Evaluation",
        ),
        nsd_plot=report(
            "results/evaluation/nsd_per_class.png",
            caption="../report/nsd_per_class.rst",
            category="Evaluation",
        ),
        hd95_plot=report(
            "results/evaluation/hd95_per_class.png",
            caption="../report/hd95_per_class.rst",
            category="Evaluation",
        ),
        failed=report(
            "results/evaluation/failed_cases.tsv",
            caption="../report/failed_cases.rst",
            category="Evaluation",
        ),
    log:
        "logs/aggregate.log",
    params:
        tables=TABLE_ARGS,
        out=lambda wildcards, output: Path(output.per_class).parent,
        dask=aggregate_backend(),
    conda:
        "../envs/universal.yaml"
    threads: config["aggregate"]["threads"]
    resources:
        mem_mb=4000,
        runtime=60,
    shell:
        "universal aggregate {params.tables} --metrics {input.metrics:q} --failures {input.failures:q} "
        "--out {params.out:q} --threads {threads} --memory-mb {resources.mem_mb}{params.dask} > {log:q} 2>&1"
