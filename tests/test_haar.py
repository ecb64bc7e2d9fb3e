"""OpenCV Haar cascade: the unavailable path (OpenCV 5) and, where OpenCV 4 is installed, real boxes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.detectors import haar
from pipeline.detectors.registry import DETECTORS, build
from pipeline.errors import ConfrankError
from stages.weights import detectors_cli

needs_cascade = pytest.mark.skipif(
    haar.unavailable_reason() is not None, reason=f"Haar cascade unavailable here: {haar.unavailable_reason()}",
)


def test_unavailable_without_cascade_classifier(monkeypatch, tmp_path):
    monkeypatch.delattr(cv2, "CascadeClassifier", raising=False)
    reason = haar.unavailable_reason()
    assert reason is not None and "cv2.CascadeClassifier" in reason and cv2.__version__ in reason
    assert DETECTORS["haar"].unavailable_reason() == reason
    with pytest.raises(ConfrankError, match=r"detector 'haar' is unavailable: .*CascadeClassifier"):
        build("haar", {}, torch.device("cpu"))
    res = CliRunner().invoke(detectors_cli, ["--cache-dir", str(tmp_path)])
    assert res.exit_code == 0
    (line,) = [s for s in res.output.splitlines() if s.startswith("haar ")]
    assert line.split()[1] == "unavailable" and "CascadeClassifier" in line


def test_unavailable_without_cascade_file(monkeypatch, tmp_path):
    if not hasattr(cv2, "CascadeClassifier"):
        monkeypatch.setattr(cv2, "CascadeClassifier", object, raising=False)
    monkeypatch.setattr(haar, "cascade_path", lambda: tmp_path / haar.CASCADE)
    assert haar.unavailable_reason() == f"this OpenCV build ships no {haar.CASCADE} (looked in {tmp_path})"


def test_cpu_only():
    assert DETECTORS["haar"].cpu_only
    with pytest.raises(ConfrankError, match="(CPU only|unavailable)"):
        build("haar", {}, torch.device("cuda"))


def test_level_weight_to_score_monotone_in_unit_interval():
    w = np.array([-50.0, -3.0, 0.0, 0.5, 4.0, 12.4, 50.0])
    s = haar.level_weight_to_score(w)
    assert s.dtype == np.float32
    assert (s >= 0).all() and (s <= 1).all() and (np.diff(s) >= 0).all()
    assert s[2] == 0.5 and s[4] == pytest.approx(1 / (1 + np.exp(-1)))
    # the measured range of OpenCV 4's weights (0.5..12.4) stays strictly increasing in float32
    assert (np.diff(haar.level_weight_to_score(np.linspace(0.5, 12.4, 200))) > 0).all()


@needs_cascade
def test_crowd_photo(shared):
    bgr = cv2.imread(str(shared("photos", "crowd_1024.jpg")))
    det = build("haar", {}, torch.device("cpu"))
    images = torch.from_numpy(np.stack([bgr, bgr[:, ::-1]])).permute(0, 3, 1, 2).float()
    a, b = det.detect(images)
    # OpenCV 4.14 with these settings returns 18 boxes on this photo
    assert len(a.scores) >= 12 and a.landmarks is None
    assert a.boxes.dtype == a.scores.dtype == torch.float32
    assert torch.equal(a.scores, a.scores.sort(descending=True).values)
    assert float(a.scores.min()) > det.min_score and float(a.scores.max()) < 1
    h, w = bgr.shape[:2]
    assert (a.boxes[:, :2] >= 0).all() and (a.boxes[:, 2] <= w).all() and (a.boxes[:, 3] <= h).all()
    assert ((a.boxes[:, 2:] - a.boxes[:, :2]) >= 24).all()  # the cascade's window
    assert len(b.scores) >= 12  # the mirrored image finds faces too
