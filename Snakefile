# universal: a CLIP-driven universal segmentation workflow for abdominal CT.
#   snakemake --cores 2                      the synthetic demo (default config), end to end on a CPU
#   snakemake --profile slurm all            everything, on a Slurm cluster (copy profiles/slurm first)
#   snakemake infer_external                 segment the external CTs only
from snakemake.utils import min_version

min_version("9.19")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/harmonize.smk"
include: "workflow/rules/embed.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/infer.smk"
include: "workflow/rules/evaluate.smk"


rule all:
    default_target: True
    input:
        "results/model/final.pt",
        evaluation_outputs(),
        external_prediction_outputs(),


rule infer_external:
    input:
        external_prediction_outputs(),
