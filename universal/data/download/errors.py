"""The one error of the download stage."""


class DownloadError(RuntimeError):
    """A download, a checksum, an archive or a manual dataset failed; the message says which and why."""
