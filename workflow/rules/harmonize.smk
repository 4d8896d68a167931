# Harmonize every dataset's labels into the universal classes and resample to the store grid (zarr v3).


rule harmonize:
    input:
        manifest="results/manifests/{dataset}.tsv",
        classes=config["classes"],
    output:
        store=directory("results/store/{dataset}.zarr"),
        report="results/store/{dataset}.report.tsv",
    log:
        "logs/harmonize/{dataset}.log",
    params:
        tables=CATALOG_ARGS,
        spacing=" ".join(str(v) for v in config["spacing"]),
    conda:
        "../envs/universal.yaml"
    threads: 1
    resources:
        mem_mb=8000,
        runtime=240,
    shell:
        "universal harmonize {params.tables} --dataset {wildcards.dataset} --manifest {input.manifest:q} "
        "--spacing {params.spacing} --out {output.store:q} --report {output.report:q} > {log:q} 2>&1"
