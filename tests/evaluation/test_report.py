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
        metrics={
            "color_accuracy": 0.25,
            "position_accuracy": float("nan"),
            "psnr": float("inf"),
            "reference_all_accuracy": 1.0,
        },
        passed=passed,
        reasons=[] if passed else ["color_accuracy = 0.25 leads the best baseline by -0.05"],
        comparison={
            "color_accuracy": {
                "value": 0.25,
                "interval": [0.125, 0.375],
                "better": "higher",
                "baselines": {"blank": 0.0, "random_train": 0.3, "shuffled": 0.2},
                "against": ["blank", "random_train", "shuffled"],
                "best_baseline": "random_train",
                "margin": -0.05,
                "margin_interval": [-0.2, 0.1],
            }
        },
        gates={
            "color_accuracy": {"margin": 0.1, "relative": False, "required": 0.1, "passed": False}
        },
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
    assert "FAILED" in page and "leads the best baseline by -0.05" in page
    assert "color_accuracy" in page and "0.25" in page and "0.9" in page and "NaN" in page
    # The metric beside its baselines, the best one marked, the margin with its interval and
    # what the gate asked for.
    row = re.search(r"<tr><td>color_accuracy .*?</tr>", page)
    assert row is not None
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(0))
    assert cells[0] == "color_accuracy &uarr;" and cells[1].startswith("0.25 ")
    assert "[0.125, 0.375]" in cells[1] and cells[2:5] == ["0", "0.3", "0.2"]
    assert '<td class="base best">0.3</td>' in row.group(0) and "[-0.2, 0.1]" in row.group(0)
    assert "&#10007;" in row.group(0) and "<td>0.1</td>" in row.group(0)
    assert "s3://b/ckpt/step-0000010" in page
    # Captions are escaped, not interpreted.
    assert "at the top left &lt;b&gt;" in page and "left <b>" not in page
    assert "PASSED" in render_report([_section(True)])


def test_inline_png_round_trips() -> None:
    img = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    uri = png_data_uri(img)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    assert np.array_equal(decoded, img)
