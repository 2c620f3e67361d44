"""The HTML report: self-contained, with the verdict, the metrics table and the sample grid."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
from PIL import Image

from lumos.data.synthetic import ObjectSpec, render_objects
from lumos.evaluation.report import HeadSection, SampleRow, png_data_uri, render_report


def _section(passed: bool) -> HeadSection:
    img = render_objects(
        [ObjectSpec("red", "circle", "large", "top left", "striped", (0.25, 0.25))], 32
    )
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    rows = [
        SampleRow(condition_text="a large red striped circle at the top left <b>", generated=[noise],
                  truth=[img], note="no object found", ok=False),
        SampleRow(condition_images=[img], generated=[img, noise, img], truth=[img, img, img]),
    ]  # fmt: skip
    return HeadSection(
        head="t2i",
        metrics={"color_accuracy": 0.25, "position_accuracy": float("nan"), "psnr": float("inf")},
        passed=passed,
        reasons=[] if passed else ["color_accuracy = 0.25 is below the threshold 0.5"],
        thresholds={"color_accuracy": 0.5},
        baseline={"color_accuracy": 0.9},
        rows=rows,
        description="generated from captions",
    )


def test_report_is_self_contained_and_complete() -> None:
    page = render_report([_section(False)], info={"checkpoint": "s3://b/ckpt/step-0000010"})
    assert page.startswith("<!DOCTYPE html>")
    # No external resources: every image is inline.
    assert not re.search(r'src="(?!data:image/png;base64,)', page)
    assert "<script" not in page and "<link" not in page
    assert page.count("data:image/png;base64,") == 1 + 1 + 1 + 3 + 3
    assert "FAILED" in page and "is below the threshold 0.5" in page
    assert "color_accuracy" in page and "0.25" in page and "0.9" in page and "NaN" in page
    assert "s3://b/ckpt/step-0000010" in page
    # Captions are escaped, not interpreted.
    assert "at the top left &lt;b&gt;" in page and "left <b>" not in page
    assert "PASSED" in render_report([_section(True)])


def test_inline_png_round_trips() -> None:
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    uri = png_data_uri(img)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    assert np.array_equal(decoded, img)
