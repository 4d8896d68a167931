"""Write a rule's ``params.settings`` as YAML (the training settings the train rule reads with --settings)."""

import yaml

from universal.core.atomic import atomic_output

with atomic_output(snakemake.output[0]) as tmp:  # noqa: F821 (Snakemake's script object)
    tmp.write_text(yaml.safe_dump(dict(snakemake.params.settings), sort_keys=False))  # noqa: F821
