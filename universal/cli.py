"""The ``universal`` command: one subcommand per workflow stage, each a thin call into the package."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from universal.core.classes import ClassTableError, load_class_table
from universal.data.catalog import CatalogError, find_cases, load_catalog, read_manifest, select_batch, write_manifest

log = logging.getLogger("universal")


def _add_tables(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classes", type=Path, default=None, help="class table YAML (default: config/classes.yaml)")
    parser.add_argument("--include-class", action="append", default=[], metavar="NAME",
                        help="switch on a disabled class-table row (repeatable), e.g. 'Kidney Cyst'")


def _add_catalog(parser: argparse.ArgumentParser, dataset_required: bool = True) -> None:
    _add_tables(parser)
    parser.add_argument("--catalog", type=Path, default=None,
                        help="dataset catalog YAML (default: config/datasets.yaml)")
    parser.add_argument("--dataset", required=dataset_required, help="catalog key of the dataset")


def _classes(args: argparse.Namespace):
    return load_class_table(args.classes, include=args.include_class)


def _entry(args: argparse.Namespace):
    classes = _classes(args)
    catalog = load_catalog(args.catalog, classes)
    if args.dataset not in catalog:
        raise CatalogError(f"dataset {args.dataset!r} is not in the catalog; known: {', '.join(catalog)}")
    return classes, catalog[args.dataset]


def cmd_demo_data(args: argparse.Namespace) -> None:
    from universal.synthetic.demo_data import write_demo_data

    roots = write_demo_data(args.out, cases_per_dataset=args.cases, external_cases=args.external_cases,
                            seed=args.seed)
    for key, root in roots.items():
        print(f"{key}\t{root}")


def cmd_download(args: argparse.Namespace) -> None:
    from universal.data.download.datasets import download_dataset

    _, entry = _entry(args)
    root = download_dataset(entry, args.root, mirror=args.mirror, retries=args.retries, timeout_s=args.timeout)
    if args.done:
        args.done.parent.mkdir(parents=True, exist_ok=True)
        args.done.write_text(f"{entry.key}\t{entry.source['kind']}\t{root}\n")
    log.info("%s: ready in %s", entry.key, root)


def cmd_dicom_to_nifti(args: argparse.Namespace) -> None:
    from universal.data.dicom_convert import convert_series, status_counts

    counts = status_counts(convert_series(args.input, args.out, args.image, args.modality))
    log.info("%s: %s (report %s/conversion.tsv)", args.input, counts, args.out)
    if counts["failed"]:
        raise ValueError(f"{counts['failed']} series could not be converted; see {args.out}/conversion.tsv")


def cmd_manifest(args: argparse.Namespace) -> None:
    if args.sample_sheet is not None:
        from universal.data.samples import read_sample_sheet

        cases, source = read_sample_sheet(args.sample_sheet), str(args.sample_sheet)
    else:
        if args.dataset is None or args.root is None:
            raise ValueError("give --dataset and --root (a catalog dataset) or --sample-sheet")
        _, entry = _entry(args)
        cases, source = find_cases(entry, args.root), entry.key
    write_manifest(cases, args.out)
    log.info("%s: %d cases -> %s", source, len(cases), args.out)


def cmd_harmonize(args: argparse.Namespace) -> None:
    from universal.data.harmonize import harmonize_dataset

    classes, entry = _entry(args)
    cases = read_manifest(args.manifest)
    failed = harmonize_dataset(cases, entry, classes, args.out, tuple(args.spacing), args.report)
    log.info("%s: %d cases written, %d failed (see %s)", entry.key, len(cases) - len(failed), len(failed), args.report)


def cmd_embed(args: argparse.Namespace) -> None:
    from universal.embed.prompts import EncoderSpec, embed_prompts, import_embeddings, save_embeddings

    classes = _classes(args)
    if args.from_file:
        names = args.names.read_text().splitlines() if args.names else None
        record = import_embeddings(args.from_file, classes, names)
    else:
        spec = EncoderSpec(model=args.model, pretrained=args.pretrained, weights_file=args.weights_file,
                           init_seed=args.init_seed)
        if spec.pretrained.lower() == "none" and not spec.weights_file:
            logging.warning("embedding prompts with a RANDOMLY INITIALISED text tower (pretrained: none): the "
                            "embeddings carry no language knowledge; use this for demos and tests only")
        record = embed_prompts(classes, spec)
    save_embeddings(record, args.out)
    log.info("%d classes x %d dims (%s, pretrained=%s) -> %s", len(record["class_names"]),
             record["embeddings"].shape[1], record["encoder"].get("model"), record["encoder"].get("pretrained"),
             args.out)


def cmd_import_checkpoint(args: argparse.Namespace) -> None:
    from universal.model.import_original import import_original_checkpoint

    import_original_checkpoint(args.source, args.out, _classes(args), args.embeddings)


def cmd_train(args: argparse.Namespace) -> None:
    from universal.train.config import train_config_from_options
    from universal.train.loop import train

    options = _read_settings(args.settings) if args.settings else {}
    if args.init_checkpoint is not None:
        options["init_checkpoint"] = str(args.init_checkpoint)
    if args.trainable is not None:
        options["trainable"] = args.trainable
    config = train_config_from_options(options, stores=args.stores, weights=args.weights,
                                       embeddings=args.embeddings, classes=args.classes,
                                       include_classes=args.include_class, out_dir=args.out_dir)
    final = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        log.info("final checkpoint: %s", final)


def _read_settings(path: Path) -> dict:
    """A YAML (or JSON) mapping of training settings, e.g. the workflow's ``train_settings.yaml``."""
    try:
        settings = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: cannot read training settings: {err}") from err
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: training settings must be a mapping of option: value")
    return settings


def cmd_infer(args: argparse.Namespace) -> int:
    from universal.infer.batch import infer_cases, load_run
    from universal.infer.settings import InferenceSettings

    classes = _classes(args)
    chosen = select_batch(read_manifest(args.manifest), args.batch, args.batches)
    base = InferenceSettings(overlap=args.overlap, sw_batch_size=args.sw_batch_size, threshold=args.threshold,
                             device=args.device, export_nifti=args.nifti,
                             export_dicom_seg=args.dicom_seg, export_probabilities=args.probabilities,
                             mirror=args.mirror)
    run = load_run(args.checkpoint, classes, base, spacing=_tuple(args.spacing), window_hu=_tuple(args.window),
                   roi=_tuple(args.roi))
    outcomes = infer_cases(chosen, run, classes, args.out, args.report)
    failed = [o.case_id for o in outcomes if o.status == "failed"]
    if not failed:
        return 0
    log.error("%d of %d cases failed: %s (see %s)", len(failed), len(chosen), failed, args.report)
    if len(failed) == len(chosen):
        log.error("every case of the batch failed")
        return 1
    return 0 if args.tolerate_failures else 1


def _tuple(values: list | None) -> tuple | None:
    return None if values is None else tuple(values)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from universal.evaluate.metrics import evaluate_predictions

    classes, entry = _entry(args)
    cases = select_batch(read_manifest(args.manifest), args.batch, args.batches)
    written = evaluate_predictions(cases, entry, classes, args.predictions, args.batch_report, args.out,
                                   args.failures)
    log.info("%s: %d of %d cases evaluated (failures: %s)", entry.key, len(written), len(cases), args.failures)


def cmd_aggregate(args: argparse.Namespace) -> None:
    from universal.evaluate.aggregate import aggregate

    classes = _classes(args)
    paths = sorted(p for folder in args.metrics for p in Path(folder).glob("*.tsv"))
    slurm_cluster = yaml.safe_load(args.slurm_cluster) if args.slurm_cluster else None
    if slurm_cluster is not None and not isinstance(slurm_cluster, dict):
        raise ValueError(f"--slurm-cluster: expected a mapping of SLURMCluster options, got {args.slurm_cluster!r}")
    outputs = aggregate(paths, classes, args.out, threads=args.threads, failures=args.failures,
                        memory_mb=args.memory_mb, scheduler=args.scheduler, slurm_cluster=slurm_cluster)
    log.info("%d case tables -> %s", len(paths), ", ".join(str(p) for p in outputs.values()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="universal", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo-data", help="write the synthetic phantom datasets in their native layouts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", type=int, default=6, help="cases per training dataset")
    p.add_argument("--external-cases", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("download", help="download and verify a dataset (or check a manual download)")
    _add_catalog(p)
    p.add_argument("--root", type=Path, required=True, help="the dataset's folder")
    p.add_argument("--mirror", default=None, help="replace the scheme and host of every URL (or $UNIVERSAL_MIRROR)")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per network operation")
    p.add_argument("--done", type=Path, default=None, help="marker file to write when the dataset is ready")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("dicom-to-nifti", help="convert DICOM series (e.g. an IDC download) to NIfTI images")
    p.add_argument("--input", type=Path, required=True, help="folder searched for DICOM series (one per folder)")
    p.add_argument("--out", type=Path, required=True, help="root the image template is relative to")
    p.add_argument("--image", default="img/{PatientID}.nii.gz",
                   help="output path template of DICOM attributes (default: img/{PatientID}.nii.gz)")
    p.add_argument("--modality", default="CT", help="series of this modality are converted (default: CT)")
    p.set_defaults(func=cmd_dicom_to_nifti)

    p = sub.add_parser(
        "manifest", help="list the cases of a dataset folder or a sample sheet into a validated manifest",
        description="Write a case manifest: a TSV with the columns dataset, case_id, image (absolute path) and label "
                    "(absolute path, empty for unlabelled cases), one row per case. The cases come from a catalog "
                    "dataset's folder (--dataset and --root) or from a sample sheet (--sample-sheet: a TSV of "
                    "case_id and image, workflow/schemas/samples.schema.yaml).")
    _add_catalog(p, dataset_required=False)
    p.add_argument("--root", type=Path, default=None, help="the dataset's folder (with --dataset)")
    p.add_argument("--sample-sheet", type=Path, default=None, help="a TSV of case_id and image to list instead")
    p.add_argument("--out", type=Path, required=True, help="manifest TSV to write")
    p.set_defaults(func=cmd_manifest)

    p = sub.add_parser("harmonize", help="harmonize labels and resample a dataset into a zarr store")
    _add_catalog(p)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="zarr store to write (<dataset>.zarr)")
    p.add_argument("--spacing", type=float, nargs=3, default=(1.5, 1.5, 1.5), metavar=("X", "Y", "Z"))
    p.add_argument("--report", type=Path, required=True, help="per-case status TSV")
    p.set_defaults(func=cmd_harmonize)

    p = sub.add_parser("embed", help="embed each class's prompt with a CLIP text encoder (open-clip-torch)")
    _add_tables(p)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--model", default="ViT-B-32", help="open_clip model name, e.g. ViT-B-32 or an hf-hub: name")
    p.add_argument("--pretrained", default="openai", help="open_clip pretrained tag, or 'none' for random init")
    p.add_argument("--weights-file", default=None, help="local weights file (offline clusters)")
    p.add_argument("--init-seed", type=int, default=0, help="seed of the random initialisation (pretrained 'none')")
    p.add_argument("--from-file", type=Path, default=None, help="import a precomputed table (e.g. txt_encoding.pth)")
    p.add_argument("--names", type=Path, default=None, help="row names of a bare tensor, one per line")
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser(
        "import-checkpoint", help="convert a checkpoint of the original CLIP-Driven Universal Model into ours",
        description="Convert a released checkpoint of the original (clip_driven_universal_swin_unetr.pth or "
                    "clip_driven_universal_unet.pth, or one of its training script) into a checkpoint of ours that "
                    "computes the same logits and carries the original's preprocessing (1.5 mm RAS grid, window "
                    "-175..250 HU, 96^3 windows). The file is read with torch.load(weights_only=True) only.")
    _add_tables(p)
    p.add_argument("--source", type=Path, required=True, help="the original's checkpoint (.pth)")
    p.add_argument("--out", type=Path, required=True, help="our checkpoint to write (.pt)")
    p.add_argument("--embeddings", type=Path, default=None,
                   help="replace the checkpoint's class embeddings by name, e.g. with the original's txt_encoding.pth")
    p.set_defaults(func=cmd_import_checkpoint)

    p = sub.add_parser(
        "train", help="train (or fine-tune) the universal model on zarr stores; multi-GPU with torchrun",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train the universal model on zarr stores; resumes from the newest checkpoint in --out-dir.",
        epilog="multi-process (DDP): torchrun --nproc_per_node=N -m universal.cli train ...  (NCCL on GPUs, one\n"
               "  per LOCAL_RANK; gloo on CPU; batch_size is per process; rank 0 writes the log and checkpoints)\n"
               "fine-tune on a novel class or task: a class table (or --include-class) and embeddings with the new\n"
               "  class, plus --init-checkpoint old/final.pt --trainable heads (or the settings init_checkpoint and\n"
               "  trainable). Starts at step 0 with a fresh optimizer; every weight that fits\n"
               "  is copied, the class embeddings come from --embeddings; 'heads' freezes the backbone and trains\n"
               "  text_to_vision, controller, GAP and precls_conv.")
    _add_tables(p)
    p.add_argument("--stores", type=Path, nargs="+", required=True)
    p.add_argument("--weights", type=float, nargs="*", default=None, help="sampling weight per store")
    p.add_argument("--embeddings", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--settings", type=Path, default=None,
                   help="YAML file of training settings (the workflow config's train section, e.g. lr: 0.002)")
    p.add_argument("--init-checkpoint", type=Path, default=None,
                   help="fine-tune from this trained checkpoint (same as the option init_checkpoint)")
    p.add_argument("--trainable", choices=("all", "heads"), default=None,
                   help="what fine-tuning trains: all, or heads (frozen backbone); same as the option trainable")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "infer", help="predict the CTs of a manifest into OME-Zarr (one batch: the model loaded once)",
        description="Predict one batch of a manifest's cases into --out/<case_id>.ome.zarr and write the batch "
                    "report (case_id, status, seconds, error). Cases whose complete predictions of the same run "
                    "exist are skipped. Exit status: 0 when every case succeeded (or, with --tolerate-failures, "
                    "when at least one did), 1 otherwise, 2 for a usage or input error.")
    _add_tables(p)
    p.add_argument("--manifest", type=Path, required=True, help="case manifest TSV (universal manifest)")
    p.add_argument("--checkpoint", type=Path, required=True, help="model checkpoint (trained or imported)")
    p.add_argument("--out", type=Path, required=True, help="folder of the predictions")
    p.add_argument("--report", type=Path, required=True, help="batch report TSV to write")
    p.add_argument("--batch", type=int, default=0, help="which batch: case i belongs to batch i %% batches")
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--spacing", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="model grid (mm); default: the checkpoint's")
    p.add_argument("--window", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="intensity window (HU); default: the checkpoint's")
    p.add_argument("--roi", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="sliding-window size (voxels); default: the checkpoint's")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--sw-batch-size", type=int, default=2)
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--nifti", action="store_true", help="also write organ and tumour label maps as NIfTI")
    p.add_argument("--dicom-seg", action="store_true",
                   help="for a DICOM series input, also write a DICOM-SEG referencing the series")
    p.add_argument("--probabilities", action="store_true",
                   help="keep each predicted class's probabilities (uint8 steps of 1/255, model grid) in the OME-Zarr")
    p.add_argument("--mirror", action="store_true",
                   help="test-time augmentation: average with a left-right mirrored pass (lateral classes swapped)")
    p.add_argument("--tolerate-failures", action="store_true",
                   help="exit 0 when some cases failed but not all (they are listed in the report)")
    p.set_defaults(func=cmd_infer)

    p = sub.add_parser("evaluate", help="Dice, NSD and HD95 per case and class against harmonized labels")
    _add_catalog(p)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--predictions", type=Path, required=True, help="folder of <case>.ome.zarr predictions")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--batch-report", type=Path, required=True, help="the inference batch's report TSV")
    p.add_argument("--out", type=Path, required=True, help="folder for one metrics TSV per case")
    p.add_argument("--failures", type=Path, required=True,
                   help="TSV listing the cases not evaluated, with the stage and the reason")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("aggregate", help="aggregate per-case metrics with dask into tables and a plot")
    _add_tables(p)
    p.add_argument("--metrics", type=Path, nargs="+", required=True, help="folders of per-case metric TSVs")
    p.add_argument("--failures", type=Path, nargs="*", default=[], help="failure lists of the evaluation batches")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1, help="threads of the local dask cluster's worker")
    p.add_argument("--memory-mb", type=int, default=None,
                   help="memory limit of the local dask cluster's worker (default: dask's share of the machine)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--scheduler", default=None,
                       help="use a running dask scheduler instead: its address (tcp://host:8786) or scheduler file")
    where.add_argument("--slurm-cluster", default=None, metavar="YAML",
                       help="start a dask-jobqueue SLURMCluster instead, with these options as a YAML mapping, "
                            "e.g. '{jobs: 4, cores: 8, memory: 32GB, queue: cpu, account: lab, walltime: 01:00:00}'")
    p.set_defaults(func=cmd_aggregate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from universal.core.atomic import DiskFullError
    from universal.core.volume import VolumeError
    from universal.data.download.errors import DownloadError
    from universal.data.harmonize import HarmonizeError
    from universal.embed.prompts import EmbedError

    try:
        status = args.func(args)
    except (CatalogError, ClassTableError, DiskFullError, DownloadError, EmbedError, HarmonizeError, VolumeError,
            ValueError) as err:
        print(f"universal {args.command}: error: {err}", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
