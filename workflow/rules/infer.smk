# Cluster-parallel inference: the cases of a manifest are split into batches, each a job that loads the model once.
# Predictions go to results/predictions/<set>/<case>.ome.zarr; a batch's declared output is its report, so a
# failed or cancelled batch keeps its finished cases and its rerun predicts only the others.


rule infer:
    input:
        manifest="results/manifests/{dataset}.tsv",
        checkpoint=trained_model(),
    output:
        report="results/predictions/{dataset}/batch_{batch}.tsv",
    log:
        "logs/infer/{dataset}_batch_{batch}.log",
    params:
        tables=TABLE_ARGS,
        out=lambda wildcards, output: Path(output.report).parent,
        batches=config["infer"]["batches"],
        overrides=infer_overrides(),
        overlap=config["infer"]["overlap"],
        sw_batch_size=config["infer"]["sw_batch_size"],
        threshold=config["infer"]["threshold"],
        nifti="--nifti" if config["infer"]["export_nifti"] else "",
        tolerate="--tolerate-failures" if config["infer"]["tolerate_failures"] else "",
        mirror="--mirror" if config["infer"]["mirror"] else "",
        dicom_seg="--dicom-seg" if config["infer"]["export_dicom_seg"] else "",
        probabilities="--probabilities" if config["infer"]["export_probabilities"] else "",
        device=config["device"],
    conda:
        "../envs/universal.yaml"
    threads: 2
    resources:
        mem_mb=16000,
        runtime=12 * 60,
        gpu=GPU,
    shell:
        "universal infer {params.tables} --manifest {input.manifest:q} --checkpoint {input.checkpoint:q} "
        "--batch {wildcards.batch} --batches {params.batches}{params.overrides} --overlap {params.overlap} "
        "--sw-batch-size {params.sw_batch_size} --threshold {params.threshold} --device {params.device} "
        "{params.nifti} {params.tolerate} {params.mirror} {params.dicom_seg} {params.probabilities} --out {params.out:q} --report {output.report:q} > {log:q} 2>&1"
