"""Download public datasets with checksums, resume and retries, and extract their archives safely.

The catalog (``config/datasets.yaml``) says how each dataset is obtained (its ``source``):

- :mod:`.fetch`: one URL streamed to ``<dest>.partial``, resumed with an HTTP ``Range`` request after an
  interruption, retried with exponential backoff on transient failures, checksum-verified and only then renamed
  to ``dest``. A file whose checksum the catalog does not know yet gets one recorded in ``<dest>.sha256`` (with
  a WARNING), so every later run verifies it.
- :mod:`.archives`: a tar or zip archive unpacked after every member is checked (no absolute paths, no ``..``,
  no links, no device files), renamed into place only when complete.
- :mod:`.datasets`: a catalog entry's ``source.kind`` dispatched (url, zenodo, idc, manual, generated), with
  an optional mirror that replaces the scheme and host of every URL (``UNIVERSAL_MIRROR``).
"""
