"""Anatomical location of CMBs (MNI template + region atlas registered to the scan) and the clinical
summary / report. Needs the optional ``atlas`` extra (nilearn, for its bundled MNI152 files)."""
