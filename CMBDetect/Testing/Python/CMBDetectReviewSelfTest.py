"""Slicer self-test of the review layer alone (no model needed): runs inside Slicer via ctest.

The full workflow with a model is ``CMBDetectTest`` in ``CMBDetect.py``; this one checks, in the real
application, that a review keeps decisions through threshold changes and survives save / load.
"""

import tempfile
import unittest

import numpy as np
import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest


class CMBDetectReviewSelfTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ReviewRoundTrip()

    def test_ReviewRoundTrip(self):
        from CMBDetectLib.mrml import geometry
        from CMBDetectLib.mrml.review_session import ReviewSession
        from CMBDetectLib.pipeline import CandidateRecord, DetectionParameters, DetectionResult
        from CMBDetectLib.volume import Volume

        shape = (20, 40, 40)
        image = np.full(shape, 500.0, np.float32)
        labels = np.zeros(shape, np.uint16)
        records = []
        for cmb_id, (k, j, i) in enumerate([(10, 10, 10), (10, 30, 30)], start=1):
            labels[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = cmb_id
            image[k - 1:k + 2, j - 1:j + 2, i - 1:i + 2] = 100.0
            volume = Volume(image)
            records.append(CandidateRecord(
                id=cmb_id, centroid_ijk=(i, j, k), centroid_ras=tuple(volume.index_to_ras((k, j, i))[0]),
                volume_mm3=27.0, volume_voxels=27, p_det=0.9, p_disc=0.5 + 0.3 * cmb_id, ellipticity=0.0,
                edge_distance_mm=10.0, final=True, reason=None))
        volume = Volume(image)
        node = geometry.volume_to_node(volume, "swi", scene=slicer.mrmlScene)
        result = DetectionResult(records, DetectionParameters(), volume.with_array(labels))
        session = ReviewSession.create(node, result, "swi")
        session.accept(1)
        session.reject(2)
        directory = tempfile.mkdtemp()
        paths = session.save(directory, case="selftest")
        state = session.state()
        session.remove_nodes()
        resumed = ReviewSession.load(node, paths["review"])
        self.assertEqual(resumed.state(), state)


if __name__ == "__main__":
    unittest.main()
