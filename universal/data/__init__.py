"""Stage 1–3, data: the dataset catalog, downloads, DICOM conversion, reading each dataset's layout,
harmonization into the universal label space, and the zarr training store."""
