# Configuration validation and the small helpers the rules share. Logic lives in the universal package.
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

from universal.data.catalog import load_catalog
from universal.core.classes import load_class_table


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
if not TRAIN_DATASETS:
    raise ValueError("config datasets: at least one dataset with catalog role 'train' is needed")
VALIDATION = config["validation"]
_unknown = sorted(set(VALIDATION["datasets"]) - set(DATASETS))
if _unknown:
    raise ValueError(f"validation datasets {_unknown} are not among the config's datasets {sorted(DATASETS)}")
VALIDATION_DATASETS = list(VALIDATION["datasets"]) if VALIDATION["every"] > 0 else []
SAMPLE_SHEET = "external_samples"
GPU = 1 if config["device"] == "cuda" else 0
SPACING = " ".join(str(v) for v in config["spacing"])
TABLE_ARGS = f"--classes {config['classes']}" + "".join(
    f" --include-class '{name}'" for name in config["include_classes"]
)
CATALOG_ARGS = f"{TABLE_ARGS} --catalog {config['catalog']}"


wildcard_constraints:
    dataset="|".join(list(DATASETS) + [SAMPLE_SHEET]),
    batch=r"\d+",


def dataset_root(wildcards):
    return DATASETS[wildcards.dataset]["root"]


def dataset_source(wildcards):
    """What must exist before a dataset's cases are listed: the demo data for generated datasets, the
    download (or manual-download check) marker for the others."""
    if CATALOG[wildcards.dataset].source["kind"] == "generated":
        return f"{config['demo']['out']}/README.txt"
    return f"results/downloads/{wildcards.dataset}.done"


def batches_of(dataset):
    key = "external" if dataset == SAMPLE_SHEET else "infer"
    return range(config[key]["batches"])


def prediction_dirs(dataset):
    return [f"results/predictions/{dataset}/batch_{b}" for b in batches_of(dataset)]


def metric_dirs():
    return [f"results/metrics/{d}/batch_{b}" for d in EXTERNAL_DATASETS for b in batches_of(d)]


def evaluation_outputs():
    if not EXTERNAL_DATASETS:
        return []
    return [
        "results/evaluation/per_class.tsv",
        "results/evaluation/per_dataset_class.tsv",
        "results/evaluation/dice_per_class.png",
    ]


def external_prediction_outputs():
    outputs = [p for d in EXTERNAL_DATASETS for p in prediction_dirs(d)]
    if config["external"]["samples"]:
        outputs += prediction_dirs(SAMPLE_SHEET)
    return outputs


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


def embed_arguments():
    embed = config["embed"]
    if embed.get("from_file"):
        return f"--from-file {embed['from_file']}"
    arguments = f"--model {embed['model']} --pretrained {embed['pretrained']} --init-seed {embed['init_seed']}"
    if embed.get("weights_file"):
        arguments += f" --weights-file {embed['weights_file']}"
    return arguments


def load_sample_sheet(path):
    """The external sample sheet, validated row by row against its schema."""
    sheet = pd.read_csv(path, sep="\t", dtype=str).fillna("")
    validate(sheet, schema="../schemas/samples.schema.yaml")
    duplicated = sheet["case_id"][sheet["case_id"].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"{path}: duplicate case_id values {duplicated}")
    return sheet
