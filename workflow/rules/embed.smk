# One CLIP text embedding per class prompt (open-clip-torch), or a precomputed table imported by class name.


rule embed:
    input:
        config["classes"],
    output:
        "results/embeddings/prompts.pt",
    log:
        "logs/embed.log",
    params:
        tables=TABLE_ARGS,
        encoder=embed_arguments(),
    conda:
        "../envs/universal.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    shell:
        "universal embed {params.tables} {params.encoder} --out {output:q} > {log:q} 2>&1"
