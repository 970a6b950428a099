"""DICOM nodes named in server configuration: pull series from them, push results to them."""
