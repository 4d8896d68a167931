"""Stage 6, infer: sliding-window prediction, post-processing, mapping back onto the CT's grid, and the
OME-Zarr and NIfTI outputs, and the DICOM-SEG of a DICOM input (``dicom_seg``)."""
