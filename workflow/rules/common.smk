# Configuration checks and the small helpers the rules share. Logic lives in the universal package.
import json
from pathlib import Path
from shlex import quote

from snakemake.logging import logger
from snakemake.utils import validate

from universal.core.classes import load_class_table
from universal.data.catalog import load_catalog


validate(config, schema="../schemas/config.schema.yaml")

CLASSES = load_class_table(config["classes"], include=config["include_classes"])
CATALOG = load_catalog(config["catalog"], CLASSES)
_unknown = sorted(set(config["datasets"]) - set(CATALOG))
if _unknown:
    raise ValueError(
        f"config datasets {_unknown} are not in the catalog {config['catalog']}; known: {sorted(CATALOG)}"
    )
# Generated (synthetic) datasets take part only while the demo is enabled: a config for real data that is
# layered over the demo config (--configfile merges mappings) thus leaves the phantoms out.
DATASETS = {
    key: settings
    for key, settings in config["datasets"].items()
    if config["demo"]["enabled"] or CATALOG[key].source["kind"] != "generated"
}
TRAIN_DATASETS = [key for key in DATASETS if CATALOG[key].role == "train"]
EXTERNAL_DATASETS = [key for key in DATASETS if CATALOG[key].role == "external"]
MODEL = config["model"]  # an existing checkpoint: nothing is trained
if not TRAIN_DATASETS and not MODEL:
    raise ValueError(
        "config: no dataset with catalog role 'train' and no `model`: give training datasets or a checkpoint"
    )
VALIDATION = config["validation"]
_unknown = sorted(set(VALIDATION["datasets"]) - set(DATASETS))
if _unknown:
    raise ValueError(f"validation datasets {_unknown} are not among the config's datasets {sorted(DATASETS)}")
VALIDATION_DATASETS = list(VALIDATION["datasets"]) if VALIDATION["every"] > 0 else []
GPU = 1 if config["device"] == "cuda" else 0
TRAIN_GPUS = config["train"].get("gpus", 1) * GPU  # GPUs the training job asks for (0 on the CPU)
TABLE_ARGS = f"--classes {quote(config['classes'])}" + "".join(
    f" --include-class {quote(name)}" for name in config["include_classes"]
)
CATALOG_ARGS = f"{TABLE_ARGS} --catalog {quote(config['catalog'])}"

# A sample sheet of CTs to segment (`snakemake infer_external`), checked row by row now, before any job (its module
# imports torch: only where a sample sheet is given, which keeps the workflow quick to read in every cluster job).
SAMPLE_SHEETS = []
if config["external_samples"]:
    from universal.data.samples import read_sample_sheet, sample_sheet_name

    if workflow.is_main_process:
        read_sample_sheet(config["external_samples"])
    SAMPLE_SHEETS = [sample_sheet_name(config["external_samples"])]
    if SAMPLE_SHEETS[0] in DATASETS:
        raise ValueError(
            f"external_samples {config['external_samples']}: its name {SAMPLE_SHEETS[0]!r} is also a dataset's; "
            "rename the sample sheet"
        )
    if not MODEL:
        logger.warning(
            "external_samples without a `model`: the sample sheet is segmented with results/model/final.pt, which "
            "this workflow trains first if it is missing; give model=<checkpoint> to use an existing one"
        )


def train_settings():
    """The training options of the config (the `train` section, the device and validation), checked now: an
    unknown key or a value outside a setting's choices fails before any job runs."""
    training = {key: value for key, value in config["train"].items() if key != "gpus"}  # the job's, not the loop's
    settings = {**training, "device": config["device"], **validation_options()}
    # Checked by the Snakemake the user started; the Snakemake of each cluster job, which reads the workflow
    # again, skips the check and the seconds of torch and MONAI imports it costs.
    if workflow.is_main_process:
        from universal.train.config import train_config_from_options

        train_config_from_options(settings, stores=[], weights=None, embeddings="", classes=None,
                                  include_classes=[], out_dir="")
    return settings


def validation_options():
    """The training options that switch on validation Dice on the stores of the validation datasets."""
    if not VALIDATION_DATASETS:
        return {}
    return {
        "val_stores": [f"results/store/{d}.zarr" for d in VALIDATION_DATASETS],
        "val_every": VALIDATION["every"],
        "val_cases": VALIDATION["cases"],
        "val_overlap": VALIDATION["overlap"],
    }


TRAIN_SETTINGS = train_settings()


wildcard_constraints:
    dataset="|".join(list(DATASETS) + SAMPLE_SHEETS),
    batch=r"\d+",


def train_command():
    """`universal train`, started by torchrun with one process per GPU when the training job has several."""
    if TRAIN_GPUS > 1:
        return f"torchrun --standalone --nproc_per_node={TRAIN_GPUS} -m universal.cli train"
    return "universal train"


def dataset_root(wildcards):
    return DATASETS[wildcards.dataset]["root"]


def dataset_source(wildcards):
    """What must exist before a dataset's cases are listed: the demo data for generated datasets, the
    download (or manual-download check) marker for the others."""
    if CATALOG[wildcards.dataset].source["kind"] == "generated":
        return f"{config['demo']['out']}/README.txt"
    return f"results/downloads/{wildcards.dataset}.done"


def trained_model():
    """The checkpoint inference uses: the configured `model`, or the one this workflow trains."""
    return MODEL or "results/model/final.pt"


def prediction_reports(sets):
    """The batch reports of the prediction sets (datasets or sample sheets); each batch is one job."""
    return [f"results/predictions/{s}/batch_{b}.tsv" for s in sets for b in range(config["infer"]["batches"])]


def metric_dirs():
    """The evaluation batches: every batch of every external dataset with labels."""
    labelled = [d for d in EXTERNAL_DATASETS if CATALOG[d].labelled]
    return [f"results/metrics/{d}/batch_{b}" for d in labelled for b in range(config["infer"]["batches"])]


def evaluation_outputs():
    if not metric_dirs():
        return []
    return [
        "results/evaluation/per_class.tsv",
        "results/evaluation/per_dataset_class.tsv",
        "results/evaluation/dice_per_class.png",
        "results/evaluation/failed_cases.tsv",
    ]


def embed_arguments():
    embed = config["embed"]
    if embed.get("from_file"):
        return f"--from-file {quote(embed['from_file'])}"
    arguments = f"--model {quote(embed['model'])} --pretrained {quote(embed['pretrained'])} --init-seed {embed['init_seed']}"
    if embed.get("weights_file"):
        arguments += f" --weights-file {quote(embed['weights_file'])}"
    return arguments


def aggregate_backend():
    """The aggregate command's options for where dask runs: nothing (a LocalCluster sized from the job), a running
    scheduler, or a SLURMCluster with the config's options."""
    dask = config["aggregate"]
    if dask.get("scheduler") and dask.get("slurm_cluster"):
        raise ValueError("config aggregate: give either `scheduler` or `slurm_cluster`, not both")
    if dask.get("scheduler"):
        return f" --scheduler {quote(str(dask['scheduler']))}"
    if dask.get("slurm_cluster"):
        return f" --slurm-cluster {quote(json.dumps(dask['slurm_cluster']))}"
    return ""


def infer_overrides():
    """Named options for the preprocessing values the config sets explicitly; the others come from the checkpoint."""
    infer = config["infer"]
    options = {"spacing": infer.get("spacing"), "window": infer.get("window_hu"), "roi": infer.get("roi")}
    return "".join(f" --{key} " + " ".join(str(v) for v in value) for key, value in options.items() if value)
