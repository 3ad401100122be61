"""The Slicer scene layer of CMBDetect: results -> segmentation / table nodes, review, navigation.

Every module imports ``slicer`` lazily inside functions, so ``CMBDetectLib`` stays importable without
Slicer, and everything here runs with the headless ``slicer-core`` wheel (no Qt) as well as inside the
Slicer application. The entry point is :class:`CMBDetectLib.mrml.review_session.ReviewSession`.
"""
