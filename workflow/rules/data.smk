# Datasets: the synthetic demo, downloads, and the case manifests of datasets and sample sheets.


rule demo_data:
    output:
        readme=f"{config['demo']['out']}/README.txt",
    log:
        "logs/demo_data.log",
    params:
        out=lambda wildcards, output: Path(output.readme).parent,
        cases=config["demo"]["cases_per_dataset"],
        external=config["demo"]["external_cases"],
        seed=config["demo"]["seed"],
    conda:
        "../envs/universal.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    shell:
        "universal demo-data --out {params.out:q} --cases {params.cases} "
        "--external-cases {params.external} --seed {params.seed} > {log:q} 2>&1"


# Downloads need the internet, which compute nodes often lack: they run on the host that runs Snakemake.
# The dataset folder is not a declared output, so that a failed job never deletes hand-placed data or a
# partial download that can be resumed.
localrules:
    download,


rule download:
    output:
        "results/downloads/{dataset}.done",
    log:
        "logs/download/{dataset}.log",
    params:
        root=dataset_root,
        tables=CATALOG_ARGS,
    conda:
        "../envs/universal.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=24 * 60,
    shell:
        "universal download {params.tables} --dataset {wildcards.dataset} --root {params.root:q} "
        "--done {output:q} > {log:q} 2>&1"


checkpoint manifest:
    wildcard_constraints:
        dataset="|".join(DATASETS),
    input:
        dataset_source,
    output:
        "results/manifests/{dataset}.tsv",
    log:
        "logs/manifest/{dataset}.log",
    params:
        root=dataset_root,
        tables=CATALOG_ARGS,
    conda:
        "../envs/universal.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "universal manifest {params.tables} --dataset {wildcards.dataset} --root {params.root:q} "
        "--out {output:q} > {log:q} 2>&1"


rule sample_sheet_manifest:
    input:
        config["external_samples"] or [],
    output:
        "results/manifests/{sheet}.tsv".format(sheet=SAMPLE_SHEETS[0] if SAMPLE_SHEETS else "_no_sample_sheet"),
    log:
        "logs/manifest/sample_sheet.log",
    conda:
        "../envs/universal.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    shell:
        "universal manifest --sample-sheet {input:q} --out {output:q} > {log:q} 2>&1"
